"""HTTP calls to a running node that tests of several concerns make: the admin API
(as an admin by default), the sessions API as a given user, and the node's gauge of
open WebSocket connections."""

from __future__ import annotations

from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.support.harness import Proc, token

ADMIN = token("ops-admin", roles=["admin"])


async def request(
    node: Proc, method: str, path: str, *, auth: str | None = ADMIN, body: Any = None
) -> tuple[int, Any]:
    """One HTTP call to a node; (status, JSON body or text)."""
    headers = {"Authorization": f"Bearer {auth}"} if auth else {}
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, f"{node.url}{path}", json=body, headers=headers) as resp,
    ):
        if resp.content_type == "application/json":
            return resp.status, await resp.json()
        return resp.status, await resp.text()


async def call(
    node: Proc,
    method: str,
    path: str,
    user: str,
    *,
    roles: list[str] | None = None,
    json: Any = None,
    params: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """One authenticated request; (status, JSON body or None)."""
    headers = {"Authorization": f"Bearer {token(user, roles=roles)}"}
    async with (
        aiohttp.ClientSession() as http,
        http.request(
            method, f"{node.url}{path}", json=json, params=params, headers=headers
        ) as resp,
    ):
        body = await resp.json() if resp.content_type == "application/json" else None
        return resp.status, body


async def patch(node: Proc, session_id: str, user: str, **body: Any) -> tuple[int, Any]:
    return await call(node, "PATCH", f"/api/v1/sessions/{session_id}", user, json=body)


async def active_connections(node: Proc) -> float:
    """The node's websocket_connections_active gauge, read from its /metrics."""
    async with aiohttp.ClientSession() as http, http.get(f"{node.url}/metrics") as resp:
        text = await resp.text()
    return next(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "websocket_connections_active"
    )
