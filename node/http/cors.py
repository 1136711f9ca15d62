"""CORS for the HTTP API (SPEC §6): a page on another origin may call it.

An allowed `Origin` (FANOUT_ALLOWED_ORIGINS; any when unset) gets its preflight
answered and `Access-Control-Allow-Origin` on every response, errors included, so a
page can read why it was refused. Tokens travel in `Authorization`, never in cookies:
no credentials mode, and with no list configured the answer is `*`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web
from multidict import CIMultiDict

from node.state import STATE

ALLOW_METHODS = "GET, POST, PATCH, DELETE"
ALLOW_HEADERS = "Authorization, Content-Type"
# Seconds a browser may reuse a preflight answer (Chromium caps it at 7200).
MAX_AGE = "600"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def allowed_origin(allowed: tuple[str, ...] | None, origin: str) -> str | None:
    """The `Access-Control-Allow-Origin` value for `origin`, or None if it is not allowed."""
    if allowed is None:
        return "*"
    return origin if origin.rstrip("/") in allowed else None


@web.middleware
async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path == "/ws":
        return await handler(request)  # checks Origin itself (403 before the upgrade)
    allowed = request.app[STATE].settings.allowed_origins
    origin = request.headers.get(hdrs.ORIGIN)
    grant = None if origin is None else allowed_origin(allowed, origin)
    # With a list, the answer depends on the Origin (with it or without, allowed or not):
    # a cache must not hand one origin's answer to another.
    varies = allowed is not None
    if (
        origin is not None
        and request.method == hdrs.METH_OPTIONS
        and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers
    ):
        return _preflight(grant, varies)
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        _grant(exc.headers, grant, varies)
        raise
    _grant(response.headers, grant, varies)
    return response


def _preflight(grant: str | None, varies: bool) -> web.Response:
    if grant is None:
        refused = web.json_response(
            {"error": {"code": "FORBIDDEN", "message": "origin not allowed"}}, status=403
        )
        _grant(refused.headers, None, varies)
        return refused
    response = web.Response(status=204)
    _grant(response.headers, grant, varies)
    response.headers[hdrs.ACCESS_CONTROL_ALLOW_METHODS] = ALLOW_METHODS
    response.headers[hdrs.ACCESS_CONTROL_ALLOW_HEADERS] = ALLOW_HEADERS
    response.headers[hdrs.ACCESS_CONTROL_MAX_AGE] = MAX_AGE
    return response


def _grant(headers: CIMultiDict[str], grant: str | None, varies: bool) -> None:
    if varies:
        headers.add(hdrs.VARY, hdrs.ORIGIN)
    if grant is not None:  # else the browser keeps the answer from the page
        headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = grant
