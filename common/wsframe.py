"""RFC 6455 §5.2 framing shared by the node's sockets and the client: headers, masking.

A frame is a 2-10 byte header (FIN + opcode, then the payload length in 7, 16 or 64
bits, with the mask bit for client frames) and the payload. A server's frames are
unmasked, so a frame's bytes depend on the payload alone: `text_frame` is computed once
per message and the same bytes go to every socket (node/delivery/hub.py).
"""

from __future__ import annotations

import struct

OP_CONTINUATION, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA

_SHORT = struct.Struct("!BB")
_MEDIUM = struct.Struct("!BBH")
_LONG = struct.Struct("!BBQ")


def frame_header(opcode: int, length: int, *, masked: bool = False) -> bytes:
    """FIN + opcode, then the payload length (and the mask bit: client frames)."""
    first, bit = 0x80 | opcode, 0x80 if masked else 0
    if length < 126:
        return _SHORT.pack(first, bit | length)
    if length < 65536:
        return _MEDIUM.pack(first, bit | 126, length)
    return _LONG.pack(first, bit | 127, length)


def text_frame(payload: bytes) -> bytes:
    """A whole unmasked text frame (a server's)."""
    return frame_header(OP_TEXT, len(payload)) + payload


def mask(key: bytes, payload: bytes) -> bytes:
    """`payload` XOR the repeated 4-byte `key` (one big-integer XOR, not a byte loop)."""
    n = len(payload)
    if not n:
        return b""
    repeated = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(repeated, "little")).to_bytes(
        n, "little"
    )
