"""A WebSocket client on a raw socket, for frames no well-behaved client library sends:
unmasked frames, reserved close codes, frames in the same write as the upgrade request,
a ping flood that never reads."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
from collections.abc import Mapping
from urllib.parse import urlencode

from common.wsframe import OP_CLOSE, OP_PING, OP_PONG, OP_TEXT, frame_header, mask
from tests.support.harness import Proc, token

__all__ = ["OP_CLOSE", "OP_PING", "OP_PONG", "OP_TEXT", "RawSocket", "client_frame", "open_raw"]


def client_frame(opcode: int, payload: bytes = b"", *, masked: bool = True) -> bytes:
    """One whole client frame; `masked=False` breaks RFC 6455 §5.1 on purpose."""
    if not masked:
        return frame_header(opcode, len(payload)) + payload
    key = os.urandom(4)
    return frame_header(opcode, len(payload), masked=True) + key + mask(key, payload)


def close_frame(code: int, reason: bytes = b"") -> bytes:
    return client_frame(OP_CLOSE, struct.pack("!H", code) + reason)


def upgrade_request(node: Proc, query: Mapping[str, str], user: str | None) -> bytes:
    lines = [
        f"GET /ws?{urlencode(query)} HTTP/1.1",
        f"Host: 127.0.0.1:{node.port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}",
        "Sec-WebSocket-Version: 13",
    ]
    if user is not None:
        lines.append(f"Authorization: Bearer {token(user)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class RawSocket:
    """The client end of an upgraded connection: frames written and read by hand."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: int, head: bytes
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.status = status
        self.head = head

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self, timeout: float = 5) -> tuple[int, bytes]:
        """The next server frame: (opcode, payload)."""
        async with asyncio.timeout(timeout):
            first, second = await self.reader.readexactly(2)
            length = second & 0x7F
            if length == 126:
                length = struct.unpack("!H", await self.reader.readexactly(2))[0]
            elif length == 127:
                length = struct.unpack("!Q", await self.reader.readexactly(8))[0]
            return first & 0x0F, await self.reader.readexactly(length)

    async def close_code(self, timeout: float = 5) -> int:
        """Read until the server's close frame; its code (frames before it are skipped)."""
        async with asyncio.timeout(timeout):
            while True:
                opcode, payload = await self.recv(timeout)
                if opcode == OP_CLOSE:
                    return int(struct.unpack("!H", payload[:2])[0]) if payload else 0

    async def ended(self, timeout: float = 5) -> bool:
        """True once the server ended the connection (close frame, EOF or reset)."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    opcode, _ = await self.recv(timeout)
                    if opcode == OP_CLOSE:
                        return True
        except (asyncio.IncompleteReadError, ConnectionError):
            return True
        except TimeoutError:
            return False

    def abort(self) -> None:
        self.writer.transport.abort()


async def open_raw(
    node: Proc,
    user: str | None,
    device: str = "raw",
    *,
    behind: bytes = b"",
    then: bytes = b"",
    receive_buffer: int | None = None,
    **query: str,
) -> RawSocket:
    """Send the upgrade request (and `behind` it, in the same write, any bytes; `then`,
    in a write of its own, without waiting for the answer) and read the response head;
    `status` is 101 or the refusal's status."""
    sock = socket.socket()
    if receive_buffer is not None:
        # Before connect: the window the peer sees is what a reader that never reads holds.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", node.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(upgrade_request(node, {"device_id": device, **query}, user) + behind)
    await writer.drain()
    if then:
        await asyncio.sleep(0.001)  # not coalesced with the request (TCP_NODELAY)
        writer.write(then)
        await writer.drain()
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return RawSocket(reader, writer, status, head)
