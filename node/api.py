"""HTTP endpoints of a node: sessions (SPEC §6), health and metrics."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from common.auth import AuthError, Identity
from common.errors import SERVICE_DOWN
from common.protocol import MAX_USER_ID
from node.state import STATE, NodeState
from node.ws import bearer_token, refuse

MAX_PARTICIPANTS = 100
MAX_TTL = 30 * 86400


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


async def create_session(request: web.Request) -> web.Response:
    state = request.app[STATE]
    identity = _authenticate(state, request)
    body = await _body(request)
    participants = body.get("participants", [])
    if (
        not isinstance(participants, list)
        or len(participants) > MAX_PARTICIPANTS
        or not all(isinstance(p, str) and 1 <= len(p) <= MAX_USER_ID for p in participants)
    ):
        raise ApiError(
            400,
            "BAD_REQUEST",
            f"'participants' must be a list of up to {MAX_PARTICIPANTS} user ids",
        )
    agent = body.get("agent", "ai")
    if agent not in ("ai", "human"):
        raise ApiError(400, "BAD_REQUEST", "'agent' must be 'ai' or 'human'")
    ttl = body.get("ttl", state.settings.session_ttl)
    if not isinstance(ttl, int) or isinstance(ttl, bool) or not 1 <= ttl <= MAX_TTL:
        raise ApiError(400, "BAD_REQUEST", f"'ttl' must be whole seconds from 1 to {MAX_TTL}")
    metadata = body.get("metadata", {})
    if not isinstance(metadata, dict):
        raise ApiError(400, "BAD_REQUEST", "'metadata' must be an object")
    record = await state.store.create_session(
        owner=identity.user_id,
        participants=participants,
        agent=agent,
        ttl=ttl,
        metadata=metadata,
    )
    return _json(record.to_json(), status=201)


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
    return web.Response(
        body=generate_latest(state.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/v1/sessions", create_session)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
