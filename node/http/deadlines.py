"""Deadlines on the HTTP request head and body, against slow clients (SPEC §4, slowloris).

The head. aiohttp's keep-alive timer is armed when a connection opens and again after
every response, and when it fires while the connection still waits for a complete
request head it closes the connection (aiohttp's `RequestHandler._process_keepalive`;
tests/abuse/test_abuse_data_http.py holds it to that). So the keep-alive timeout *is* the head
deadline: FANOUT_HTTP_HEAD_TIMEOUT from connect, or from the previous response, to the
end of the next head. An idle keep-alive connection is closed after the same time.
A WebSocket turns keep-alive off at the upgrade, so sockets are not affected.

The body. `body_deadline` reads a request's body before the handler runs, within
FANOUT_HTTP_BODY_TIMEOUT of the head; the handler then reads the cached bytes. A body
that is not complete in time gets a 408 and the connection is closed (not lingered on).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from common.config import Settings
from node.ws.aiohttp_private import close_after_response

log = logging.getLogger("fanout.node")

BODY_TIMEOUT: web.AppKey[float] = web.AppKey("body_timeout", float)


def runner_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments of the node's `web.AppRunner` that bound the request head."""
    return {"keepalive_timeout": settings.http_head_timeout}


@web.middleware
async def body_deadline(request: web.Request, handler: Any) -> web.StreamResponse:
    """Read the body within the app's BODY_TIMEOUT, or answer 408 and close."""
    if request.body_exists:
        try:
            async with asyncio.timeout(request.app[BODY_TIMEOUT]):
                await request.read()
        except TimeoutError:
            return await _timed_out(request)
    response: web.StreamResponse = await handler(request)
    return response


async def _timed_out(request: web.Request) -> web.StreamResponse:
    log.info("request body from %s not complete in time; closing", request.remote)
    response = web.json_response(
        {"error": {"code": "REQUEST_TIMEOUT", "message": "request body not sent in time"}},
        status=408,
        headers={"Connection": "close"},
    )
    # Written here, then the connection closed: aiohttp would otherwise linger,
    # reading what is left of the body for another lingering_time.
    await response.prepare(request)
    await response.write_eof()
    close_after_response(request)
    return response
