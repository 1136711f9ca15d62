"""node/ws/wire.py: frame headers (RFC 6455 §5.2) and the aiohttp internals the take-over uses."""

from __future__ import annotations

import struct

from aiohttp import web
from aiohttp._websocket.reader import WebSocketDataQueue
from aiohttp.http import WebSocketReader
from aiohttp.web_protocol import RequestHandler

from common.wsframe import frame_header


def test_frame_header_lengths() -> None:
    assert frame_header(0x1, 0) == b"\x81\x00"
    assert frame_header(0x1, 125) == b"\x81\x7d"
    assert frame_header(0x1, 126) == b"\x81\x7e" + struct.pack("!H", 126)
    assert frame_header(0x9, 65535) == b"\x89\x7e\xff\xff"
    assert frame_header(0x1, 65536) == b"\x81\x7f" + struct.pack("!Q", 65536)


def test_aiohttp_internals_the_take_over_needs() -> None:
    # Pinned with aiohttp's version: if one goes, node/ws/wire.py must change with it.
    assert "feed_data" in dir(WebSocketDataQueue)
    assert "feed_data" in dir(WebSocketReader)
    assert "transport" in dir(RequestHandler) and "connection_lost" in dir(RequestHandler)
    assert isinstance(web.BaseRequest.protocol, property)
