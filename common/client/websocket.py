"""A lean WebSocket client (RFC 6455) that hands each text frame to a callback as it is parsed.

FanoutClient runs on it, and so the load generator, which receives tens of thousands of
frames a second in one process. aiohttp's client wakes a task for every frame it
receives (`async for msg in ws`): profiled, that was most of the generator's ≈20 µs per
delivery, so the generator, not the nodes, capped the machine-wide rate. Here
`data_received` parses every frame of a chunk and calls `on_text` synchronously.

Only what a fanout client needs: no extensions (permessage-deflate is not offered), no
subprotocols, no client pings (the node pings; pings are answered). A frame from the
server that breaks the protocol fails the connection with the RFC's close code (1002,
1003, 1007, 1009) instead of being guessed at.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import ssl
from collections.abc import Callable, Mapping
from typing import cast
from urllib.parse import urlencode, urlsplit

from common.httphead import parse_response_head
from common.wsframe import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    frame_header,
    mask,
)

log = logging.getLogger("fanout.wsclient")

ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# A handshake response bigger than this is not a WebSocket server's.
MAX_HANDSHAKE_BYTES = 16384
# A message (all its fragments) bigger than this fails the connection with 1009. The node
# sends frames of at most a few tens of KiB; the bound keeps a broken peer from making
# this process buffer without limit.
DEFAULT_MAX_MESSAGE = 4 * 1024 * 1024
# Seconds `close()` waits for the peer's close frame before cutting the connection.
CLOSE_TIMEOUT = 5.0

CLOSE_NORMAL, CLOSE_NO_STATUS, CLOSE_ABNORMAL = 1000, 1005, 1006
CLOSE_PROTOCOL, CLOSE_UNSUPPORTED, CLOSE_BAD_DATA, CLOSE_TOO_BIG = 1002, 1003, 1007, 1009
CLOSE_INTERNAL = 1011

TextHandler = Callable[[str], None]


class HandshakeError(ConnectionError):
    """The server answered the upgrade with something other than 101 (or a broken 101)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"WebSocket handshake refused: {status} {reason}")
        self.status = status


def accept_key(key: str) -> str:
    """The Sec-WebSocket-Accept a server must answer for `key`."""
    return base64.b64encode(hashlib.sha1(key.encode() + ACCEPT_GUID).digest()).decode()


def encode_frame(opcode: int, payload: bytes, key: bytes) -> bytes:
    """One final, masked client frame."""
    return frame_header(opcode, len(payload), masked=True) + key + mask(key, payload)


def close_payload(code: int) -> bytes:
    return b"" if code == CLOSE_NO_STATUS else code.to_bytes(2, "big")


class WebSocket(asyncio.Protocol):
    """One client connection; made by `connect`. `closed` resolves with the close code."""

    def __init__(self, request: bytes, key: str, on_text: TextHandler, max_message: int) -> None:
        self._request = request
        self._key = key
        self._on_text = on_text
        self._max_message = max_message
        self._transport: asyncio.Transport | None = None
        self._open = False
        self._close_sent = False
        self._buffer = b""
        self._need = 0  # bytes the buffered frame needs before it can be parsed
        self._fragments: list[bytes] | None = None
        self._fragments_size = 0
        self._fragments_text = True
        self._error: BaseException | None = None
        loop = asyncio.get_running_loop()
        self.handshake: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[int] = loop.create_future()
        self.close_code: int | None = None  # the peer's, or ours when we failed it

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self._transport = cast(asyncio.Transport, transport)
        self._transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        try:
            if self._open:
                self._frames(data)
            else:
                self._handshake(data)
        except Exception as exc:  # a bug in a handler: fail the connection, raise it on wait
            log.exception("WebSocket handler failed")
            self._error = exc
            self._fail(CLOSE_INTERNAL)

    def connection_lost(self, exc: Exception | None) -> None:
        self._open = False
        if not self.handshake.done():
            self.handshake.set_exception(ConnectionError(f"connection lost in handshake: {exc}"))
        if self.close_code is None:
            self.close_code = CLOSE_ABNORMAL
        if not self.closed.done():
            self.closed.set_result(self.close_code)

    # Use

    def send_text(self, data: bytes) -> None:
        """Send one text frame (`data` is UTF-8); ConnectionError when not open."""
        if not self._open or self._close_sent or self._transport is None:
            raise ConnectionError("the WebSocket is not open")
        self._transport.write(encode_frame(OP_TEXT, data, os.urandom(4)))

    async def wait_closed(self) -> int:
        """The close code once the connection is gone; re-raises a handler's exception."""
        code = await asyncio.shield(self.closed)
        if self._error is not None:
            raise self._error
        return code

    async def close(self, code: int = CLOSE_NORMAL, within: float = CLOSE_TIMEOUT) -> int:
        """Close handshake: send ours, wait for the peer's (cut after `within` s)."""
        if self._transport is not None and not self.closed.done():
            self._send_close(code)
            try:
                async with asyncio.timeout(within):
                    await asyncio.shield(self.closed)
            except TimeoutError:
                self.abort()
        return await asyncio.shield(self.closed)

    def abort(self) -> None:
        """Cut the connection without a close frame (tests: a network failure)."""
        if self._transport is not None:
            self._transport.abort()

    # Handshake

    def _handshake(self, data: bytes) -> None:
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_HANDSHAKE_BYTES:
                self._refuse(0, "handshake response too large")
            return
        head, rest = self._buffer[:end], self._buffer[end + 4 :]
        self._buffer = b""
        try:
            response = parse_response_head(head)
        except ValueError as exc:
            self._refuse(0, str(exc))
            return
        status, headers = response.status, response.headers
        if status != 101:
            self._refuse(status, response.reason)
            return
        if headers.get("upgrade", "").lower() != "websocket":
            self._refuse(status, "101 without Upgrade: websocket")
        elif headers.get("sec-websocket-accept") != accept_key(self._key):
            self._refuse(status, "wrong Sec-WebSocket-Accept")
        elif headers.get("sec-websocket-extensions"):
            self._refuse(status, "an extension was not offered")
        else:
            self._open = True
            # Resolved before the frames that came with the 101 are handed over, so the
            # caller holds this socket before any of its handlers runs.
            self.handshake.set_result(None)
            if rest:
                self._frames(rest)

    def _refuse(self, status: int, reason: str) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(HandshakeError(status, reason))
        self.abort()

    # Frames

    def _frames(self, data: bytes) -> None:
        if self._buffer:
            self._buffer += data
            if len(self._buffer) < self._need:
                return  # a big frame still arriving: do not re-parse it every chunk
            data, self._buffer = self._buffer, b""
        self._need = 0
        pos, end = 0, len(data)
        while self._open and end - pos >= 2:
            first, second = data[pos], data[pos + 1]
            size, at = second & 0x7F, pos + 2
            if size == 126:
                if end - at < 2:
                    break
                size, at = int.from_bytes(data[at : at + 2], "big"), at + 2
            elif size == 127:
                if end - at < 8:
                    break
                size, at = int.from_bytes(data[at : at + 8], "big"), at + 8
            if second & 0x80:
                self._fail(CLOSE_PROTOCOL, "masked frame from the server")
                return
            if size > self._max_message:
                self._fail(CLOSE_TOO_BIG, f"frame of {size} bytes")
                return
            if end - at < size:
                self._need = at - pos + size
                break
            pos = at + size
            self._frame(first, data[at:pos])
        if pos < end and self._open:
            self._buffer = data[pos:]

    def _frame(self, first: int, payload: bytes) -> None:
        final, opcode = first & 0x80, first & 0x0F
        if first & 0x70:
            self._fail(CLOSE_PROTOCOL, "reserved bits set")
        elif opcode in (OP_TEXT, OP_BINARY):
            if self._fragments is not None:
                self._fail(CLOSE_PROTOCOL, "a new message inside a fragmented one")
            elif final:
                self._message(opcode == OP_TEXT, payload)
            else:
                self._fragments, self._fragments_size = [payload], len(payload)
                self._fragments_text = opcode == OP_TEXT
        elif opcode == OP_CONTINUATION:
            self._continuation(bool(final), payload)
        elif not final or len(payload) > 125:
            self._fail(CLOSE_PROTOCOL, "fragmented or oversized control frame")
        elif opcode == OP_PING:
            if not self._close_sent and self._transport is not None:
                self._transport.write(encode_frame(OP_PONG, payload, os.urandom(4)))
        elif opcode == OP_CLOSE:
            self._peer_closed(payload)
        elif opcode != OP_PONG:
            self._fail(CLOSE_PROTOCOL, f"unknown opcode {opcode}")

    def _continuation(self, final: bool, payload: bytes) -> None:
        if self._fragments is None:
            self._fail(CLOSE_PROTOCOL, "continuation without a message")
            return
        self._fragments.append(payload)
        self._fragments_size += len(payload)
        if self._fragments_size > self._max_message:
            self._fail(CLOSE_TOO_BIG, f"message of {self._fragments_size}+ bytes")
        elif final:
            whole, self._fragments = b"".join(self._fragments), None
            self._message(self._fragments_text, whole)

    def _message(self, text: bool, payload: bytes) -> None:
        if not text:
            self._fail(CLOSE_UNSUPPORTED, "binary frame (fanout speaks JSON text)")
            return
        try:
            decoded = payload.decode()
        except UnicodeDecodeError:
            self._fail(CLOSE_BAD_DATA, "text frame is not UTF-8")
            return
        self._on_text(decoded)

    def _peer_closed(self, payload: bytes) -> None:
        if len(payload) == 1:
            self._fail(CLOSE_PROTOCOL, "close frame of one byte")
            return
        code = int.from_bytes(payload[:2], "big") if payload else CLOSE_NO_STATUS
        self.close_code = code
        self._open = False
        self._send_close(code)  # the echo (nothing when ours went first)
        if self._transport is not None:
            self._transport.close()

    def _send_close(self, code: int) -> None:
        if self._close_sent or self._transport is None:
            return
        self._close_sent = True
        self._transport.write(encode_frame(OP_CLOSE, close_payload(code), os.urandom(4)))

    def _fail(self, code: int, why: str = "") -> None:
        if why:
            log.warning("WebSocket failed (%d): %s", code, why)
        self.close_code = code
        self._open = False
        self._send_close(code)
        if self._transport is not None:
            self._transport.close()


async def connect(
    url: str,
    on_text: TextHandler,
    *,
    params: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
    within: float = 30.0,
    max_message: int = DEFAULT_MAX_MESSAGE,
) -> WebSocket:
    """Open a ws:// or wss:// connection within `within` s; HandshakeError if the
    server refuses the upgrade."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
    secure = parts.scheme == "wss"
    host, port = parts.hostname, parts.port or (443 if secure else 80)
    query = "&".join(q for q in (parts.query, urlencode(params or {})) if q)
    target = (parts.path or "/") + (f"?{query}" if query else "")
    shown_host = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        shown_host += f":{port}"
    key = base64.b64encode(os.urandom(16)).decode()
    fields = {
        "Host": shown_host,
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": key,
        "Sec-WebSocket-Version": "13",
        **(headers or {}),
    }
    for name, value in fields.items():
        if any(c in name + value for c in "\r\n\0"):
            raise ValueError(f"header {name!r} holds a line break or NUL")
    request = (
        f"GET {target} HTTP/1.1\r\n"
        + "".join(f"{name}: {value}\r\n" for name, value in fields.items())
        + "\r\n"
    ).encode()
    loop = asyncio.get_running_loop()
    context = ssl.create_default_context() if secure else None
    socket: WebSocket | None = None
    try:
        async with asyncio.timeout(within):
            _, socket = await loop.create_connection(
                lambda: WebSocket(request, key, on_text, max_message), host, port, ssl=context
            )
            await socket.handshake
    except BaseException:
        if socket is not None:
            socket.abort()
        raise
    return socket
