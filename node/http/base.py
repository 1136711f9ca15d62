"""What every HTTP handler of a node shares: its errors, JSON bodies and authentication."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from common.auth import AuthError, Identity
from common.errors import SERVICE_DOWN
from node.state import NodeState
from node.ws.upgrade import bearer_token, refuse


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def authenticate(state: NodeState, request: web.Request) -> Identity:
    try:
        return state.verifier.verify(bearer_token(request, allow_query=False))
    except AuthError as exc:
        raise ApiError(401, "UNAUTHORIZED", str(exc)) from None


async def read_body(request: web.Request) -> dict[str, Any]:
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
