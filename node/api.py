"""HTTP endpoints of a node: shared helpers, health and metrics (sessions: node/sessions_api.py)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from common.auth import AuthError, Identity
from common.errors import SERVICE_DOWN
from node.state import STATE, NodeState
from node.ws import bearer_token, refuse


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _authenticate(state: NodeState, request: web.Request) -> Identity:
    try:
        return state.verifier.verify(bearer_token(request, allow_query=False))
    except AuthError as exc:
        raise ApiError(401, "UNAUTHORIZED", str(exc)) from None


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw:
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ApiError(400, "BAD_REQUEST", "body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "BAD_REQUEST", "body must be a JSON object")
    return body


@web.middleware
async def api_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except ApiError as exc:
        return refuse(exc.status, exc.code, exc.message)
    except SERVICE_DOWN:
        return refuse(503, "UNAVAILABLE", "backing service unavailable; retry")


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    checks = {"redis": "ok", "postgres": "ok"}
    if state.draining:
        return _json({"status": "draining", **checks}, status=503)
    results = await asyncio.gather(
        asyncio.wait_for(state.redis.ping(), 2),
        asyncio.wait_for(state.store.ping(), 2),
        return_exceptions=True,
    )
    for name, result in zip(("redis", "postgres"), results, strict=True):
        if isinstance(result, BaseException):
            checks[name] = f"down: {type(result).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return _json(
        {"status": "ready" if ready else "unavailable", **checks}, status=200 if ready else 503
    )


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    # fanout_queue_depth is the cluster's, read from Redis (at most once a second);
    # with Redis down the scrape still answers, with the last depth read.
    with contextlib.suppress(*SERVICE_DOWN):
        await state.metrics.refresh_queue_depth(state.redis, state.keys, state.settings.partitions)
    return web.Response(
        body=generate_latest(state.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


def add_routes(app: web.Application) -> None:
    # Imported here: node.sessions_api builds on this module's helpers.
    from node import sessions_api

    sessions_api.add_routes(app)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
