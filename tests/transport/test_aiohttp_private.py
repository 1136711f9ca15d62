"""What node/ws/aiohttp_private.py relies on in aiohttp (pinned), tested as behaviour.

The reader: it calls its queue synchronously, in order, a split frame once whole, a
failure with its close code, and never stalls on a relay. The take-over, against a
real aiohttp server on loopback: where bytes sent with the upgrade request go, that
`take_upgrade_tail` hands them over whole, and that a released request leaves the
socket open to a new protocol while the handler's code goes on.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import WSMsgType, web
from aiohttp.http import WebSocketReader

from common.wsframe import OP_BINARY, OP_CLOSE, OP_PING, OP_TEXT, frame_header, mask, text_frame
from node.ws.aiohttp_private import (
    FrameReader,
    MessageRelay,
    close_after_response,
    close_code_of,
    frame_reader,
    queued_by_aiohttp,
    release_request,
    take_upgrade_tail,
)


def client_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    key = os.urandom(4)
    header = bytearray(frame_header(opcode, len(payload), masked=True))
    if not fin:
        header[0] &= 0x7F
    return bytes(header) + key + mask(key, payload)


class Recorder(MessageRelay):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[Any] = []
        self.errors: list[BaseException] = []

    def message(self, msg: Any) -> None:
        self.messages.append(msg)

    def error(self, exc: BaseException) -> None:
        self.errors.append(exc)


async def test_the_compiled_reader_is_the_one_tested() -> None:
    # The compiled reader calls a Python override of its queue's feed_data only
    # because the queue's method is `cpdef`: this is the build the node runs.
    assert WebSocketReader.__module__ == "aiohttp._websocket.reader_c"
    assert isinstance(frame_reader(Recorder(), 1024), WebSocketReader)


async def test_each_message_reaches_the_relay_before_feed_data_returns() -> None:
    relay = Recorder()
    reader = frame_reader(relay, 1 << 20)
    chunk = (
        client_frame(OP_TEXT, "héllo".encode())
        + client_frame(OP_PING, b"p")
        + client_frame(OP_BINARY, b"\x00\x01")
        + client_frame(OP_CLOSE, (1000).to_bytes(2, "big") + b"bye")
    )
    assert reader.feed_data(chunk) == (False, b"")
    kinds = [(m.type, m.data, m.extra) for m in relay.messages]
    assert kinds == [
        (WSMsgType.TEXT, "héllo", ""),
        (WSMsgType.PING, b"p", ""),
        (WSMsgType.BINARY, b"\x00\x01", ""),
        (WSMsgType.CLOSE, 1000, "bye"),
    ]
    assert relay.errors == []


async def test_a_message_split_across_reads_and_frames_is_handed_over_once_whole() -> None:
    relay = Recorder()
    reader = frame_reader(relay, 1 << 20)
    data = client_frame(OP_TEXT, b"abc", fin=False) + client_frame(0x0, b"def")
    for i in range(len(data)):
        reader.feed_data(data[i : i + 1])
        if i < len(data) - 1:
            assert relay.messages == []
    assert [m.data for m in relay.messages] == ["abcdef"]


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (client_frame(OP_TEXT, b"\xff\xfe"), 1007),  # not UTF-8
        (client_frame(0x3, b"x"), 1002),  # reserved opcode
        (client_frame(OP_TEXT, b"x" * 2000), 1009),  # over max_msg_size
    ],
)
async def test_a_bad_stream_is_reported_with_its_close_code_and_the_rest_ignored(
    frame: bytes, code: int
) -> None:
    relay = Recorder()
    reader = frame_reader(relay, 1000)
    reader.feed_data(frame)
    assert [close_code_of(e) for e in relay.errors] == [code]
    failed, _ = reader.feed_data(client_frame(OP_TEXT, b"after"))
    assert failed and relay.messages == [] and len(relay.errors) == 1
    assert close_code_of(RuntimeError()) == 1011


async def test_the_reader_never_stalls_on_a_relay() -> None:
    # A buffering queue stalls its reader past 2 x 64 KiB; a relay counts nothing.
    relay = Recorder()
    reader = frame_reader(relay, 1 << 20)
    reader.feed_data(b"".join(client_frame(OP_TEXT, b"x" * 100) for _ in range(5000)))
    assert len(relay.messages) == 5000


async def test_one_relay_serves_many_readers_each_with_its_own_partial_frame() -> None:
    class Shared(MessageRelay):
        current = ""
        got: list[tuple[str, str]] = []

        def message(self, msg: Any) -> None:
            self.got.append((self.current, msg.data))

    relay = Shared()
    readers: dict[str, FrameReader] = {name: frame_reader(relay, 1024) for name in "ab"}
    frames = {name: client_frame(OP_TEXT, name.encode() * 3) for name in "ab"}
    for half in (slice(0, 4), slice(4, None)):
        for name, reader in readers.items():
            relay.current = name
            reader.feed_data(frames[name][half])
    assert relay.got == [("a", "aaa"), ("b", "bbb")]


# -- the take-over, against a real server -------------------------------------------------

Handler = Any


class Echo(asyncio.Protocol):
    """A taken-over socket: echoes each text message as a server frame."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        relay = Recorder()
        relay.message = self.echo  # type: ignore[method-assign]
        self.reader = frame_reader(relay, 1 << 16)

    def echo(self, msg: Any) -> None:
        if msg.type == WSMsgType.TEXT:
            self.transport.write(text_frame(msg.data.encode()))

    def data_received(self, data: bytes) -> None:
        self.reader.feed_data(data)


@contextlib.asynccontextmanager
async def serving(handler: Handler, method: str = "GET") -> AsyncIterator[int]:
    app = web.Application()
    app.router.add_route(method, "/ws", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port: int = runner.addresses[0][1]
        yield port
    finally:
        await runner.cleanup()


def upgrade_request(port: int) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


async def read_101(reader: asyncio.StreamReader) -> None:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101"), head


async def until(check: Any) -> None:
    for _ in range(200):
        if check():
            return
        await asyncio.sleep(0.01)
    raise TimeoutError("condition never held")


async def test_bytes_sent_with_the_upgrade_go_to_aiohttps_own_reader_at_prepare() -> None:
    """Untouched, the tail is parsed into the response's queue: a take-over loses it."""
    seen: dict[str, Any] = {}

    async def handler(request: web.Request) -> web.StreamResponse:
        await until(lambda: request.protocol._message_tail)
        seen["tail"] = bytes(request.protocol._message_tail)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        seen["queued"] = [m.data for m in queued_by_aiohttp(ws)]
        await ws.close()
        return ws

    async with serving(handler) as port:
        frame = client_frame(OP_TEXT, b"early")
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(upgrade_request(port) + frame)
        await until(lambda: "queued" in seen)
        writer.close()
    assert seen == {"tail": frame, "queued": ["early"]}


async def test_a_taken_tail_is_whole_and_the_released_socket_serves_a_new_protocol() -> None:
    seen: dict[str, Any] = {}

    async def handler(request: web.Request) -> web.StreamResponse:
        await until(lambda: len(request.protocol._message_tail) >= 2 * len(first))
        tail = take_upgrade_tail(request)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        seen["queued"] = queued_by_aiohttp(ws)
        transport = request.transport
        assert transport is not None
        echo = Echo(transport)
        transport.set_protocol(echo)
        release_request(request)
        echo.data_received(tail)  # the frames that came with the upgrade, in order
        seen["after_release"] = True  # the handler's code goes on
        return web.Response(text="written nowhere")

    first = client_frame(OP_TEXT, b"one")
    async with serving(handler) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(upgrade_request(port) + first + client_frame(OP_TEXT, b"two"))
        await read_101(reader)
        writer.write(client_frame(OP_TEXT, b"three"))
        want = b"".join(text_frame(p) for p in (b"one", b"two", b"three"))
        got = await asyncio.wait_for(reader.readexactly(len(want)), 5)
        assert got == want
        await until(lambda: "after_release" in seen)
        # The socket is still open (the handler's return wrote nothing, closed nothing).
        writer.write(client_frame(OP_TEXT, b"four"))
        assert await asyncio.wait_for(reader.readexactly(6), 5) == text_frame(b"four")
        writer.close()
    assert seen["queued"] == []


async def test_a_connection_closed_after_its_response_does_not_wait_for_the_body() -> None:
    """A slow body's 408 (node/http/deadlines.py) is written, then the connection ends at
    once: without it aiohttp keeps reading the unread body (lingering) for seconds."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.Response(text="bye")
        await response.prepare(request)
        await response.write_eof()
        close_after_response(request)
        return response

    async with serving(handler, "POST") as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = f"POST /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 100000\r\n\r\n"
        writer.write(head.encode() + b"x" * 10)  # most of the body never comes
        answer = await asyncio.wait_for(reader.read(), 2)  # to the end of the stream
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"bye")
