"""Frame headers (RFC 6455 §5.2); the aiohttp internals: tests/transport/test_aiohttp_private.py."""

from __future__ import annotations

import struct

from common.wsframe import frame_header


def test_frame_header_lengths() -> None:
    assert frame_header(0x1, 0) == b"\x81\x00"
    assert frame_header(0x1, 125) == b"\x81\x7d"
    assert frame_header(0x1, 126) == b"\x81\x7e" + struct.pack("!H", 126)
    assert frame_header(0x9, 65535) == b"\x89\x7e\xff\xff"
    assert frame_header(0x1, 65536) == b"\x81\x7f" + struct.pack("!Q", 65536)
