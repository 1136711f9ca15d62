"""aiohttp private API the node's WebSocket take-over relies on (aiohttp==3.14.5, pinned).

Temporary home of one accessor until the adapter module for all of aiohttp's internals
lands; tests/test_abuse_ws_frames.py checks the behaviour it relies on.
"""

from __future__ import annotations

from aiohttp import web


def take_upgrade_tail(request: web.Request) -> bytes:
    """The bytes the client sent behind the upgrade request, which aiohttp holds unparsed
    (`RequestHandler._message_tail`) until a WebSocket parser is set; taken, so that
    aiohttp's own parser never sees them.

    Between the end of the request head and `WebSocketResponse.prepare` setting its
    parser, aiohttp appends every read to this tail; `prepare` does not yield to the
    loop before it sets the parser, so taking the tail just before `prepare` leaves
    aiohttp nothing to parse.
    """
    handler = request.protocol
    tail: bytes = handler._message_tail
    handler._message_tail = b""
    return tail
