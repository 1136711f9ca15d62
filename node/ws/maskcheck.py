"""RFC 6455 §5.1: a server must close the connection on an unmasked client frame.

aiohttp's frame reader unmasks what is masked and takes what is not without a word,
and the mask bit of the frame it just parsed is not visible from outside (its C
reader keeps it in a C field). So the node follows the frame boundaries itself, a
header at a time: only the 2-14 header bytes of each frame are looked at, the
payload is skipped by its length.
"""

from __future__ import annotations

_MASK_BIT = 0x80
_KEY = 4  # the masking key's bytes, after the length


class MaskCheck:
    """Follows one socket's frame boundaries; finds the first unmasked frame."""

    __slots__ = ("_head", "_skip")

    def __init__(self) -> None:
        # Bytes of the current frame not seen yet (header rest, key, payload).
        self._skip = 0
        # The start of a header cut by the end of the previous read.
        self._head = b""

    def first_unmasked(self, data: bytes) -> int:
        """Offset in `data` at which an unmasked frame starts (0 if it began in an
        earlier read), or -1 if every frame header in it so far is masked."""
        carried = len(self._head)
        if carried:
            data = self._head + data
            self._head = b""
        pos, end = 0, len(data)
        while True:
            if self._skip:
                step = min(self._skip, end - pos)
                self._skip -= step
                pos += step
            if pos >= end:
                return -1
            if end - pos < 2:
                self._head = data[pos:]
                return -1
            second = data[pos + 1]
            if not second & _MASK_BIT:
                return max(0, pos - carried)
            length = second & 0x7F
            if length == 126:
                header = 4
            elif length == 127:
                header = 10
            else:
                header = 2
            if end - pos < header:
                self._head = data[pos:]
                return -1
            if header > 2:
                length = int.from_bytes(data[pos + 2 : pos + header], "big")
            self._skip = header + _KEY + length
