"""The client's WebSocket frame parser and handshake, fed bytes through a recording transport."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.client import websocket as wsclient
from common.client.websocket import HandshakeError, WebSocket, accept_key
from common.wsframe import mask

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


class Transport:
    """Records writes; close/abort end the connection as a real transport would."""

    def __init__(self, protocol: WebSocket) -> None:
        self.protocol = protocol
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.written.append(data)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.protocol.connection_lost(None)

    abort = close


def server_frame(opcode: int, payload: bytes, *, final: bool = True, masked: bool = False) -> bytes:
    n = len(payload)
    first = (0x80 if final else 0) | opcode
    bit = 0x80 if masked else 0
    if n < 126:
        head = bytes((first, bit | n))
    elif n < 1 << 16:
        head = bytes((first, bit | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((first, bit | 127)) + n.to_bytes(8, "big")
    if masked:
        return head + b"abcd" + mask(b"abcd", payload)
    return head + payload


def text(s: str) -> bytes:
    return server_frame(wsclient.OP_TEXT, s.encode())


def upgrade(key: str = KEY, extra: str = "") -> bytes:
    return (
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept_key(key)}\r\n{extra}\r\n"
    ).encode()


def client_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Decode the client's (masked) frames: (opcode, unmasked payload)."""
    out, pos = [], 0
    while pos < len(data):
        first, second = data[pos], data[pos + 1]
        assert second & 0x80, "client frames must be masked"
        n, at = second & 0x7F, pos + 2
        if n == 126:
            n, at = int.from_bytes(data[at : at + 2], "big"), at + 2
        elif n == 127:
            n, at = int.from_bytes(data[at : at + 8], "big"), at + 8
        key, at = data[at : at + 4], at + 4
        out.append((first & 0x0F, mask(key, data[at : at + n])))
        pos = at + n
    return out


def opened(
    max_message: int = wsclient.DEFAULT_MAX_MESSAGE,
) -> tuple[WebSocket, Transport, list[str]]:
    got: list[str] = []
    ws = WebSocket(b"GET / HTTP/1.1\r\n\r\n", KEY, got.append, max_message)
    transport = Transport(ws)
    ws.connection_made(transport)  # type: ignore[arg-type]
    ws.data_received(upgrade())
    assert ws.handshake.done() and ws.handshake.exception() is None
    transport.written.clear()
    return ws, transport, got


def sent(transport: Transport) -> list[tuple[int, bytes]]:
    return client_frames(b"".join(transport.written))


async def test_frames_sent_with_the_101_come_after_the_handshake_resolves() -> None:
    order: list[str] = []
    ws = WebSocket(b"GET /", KEY, lambda t: order.append(f"text:{ws.handshake.done()}"), 1 << 20)
    transport = Transport(ws)
    ws.connection_made(transport)  # type: ignore[arg-type]
    assert transport.written == [b"GET /"]
    response = upgrade() + text("welcome")
    ws.data_received(response[:20])
    assert not ws.handshake.done()
    ws.data_received(response[20:])
    assert order == ["text:True"]


async def test_every_length_form_survives_byte_by_byte_delivery() -> None:
    ws, _, got = opened()
    messages = ["a" * 5, "b" * 300, "c" * 70_000, "", "é" * 40]
    stream = b"".join(text(m) for m in messages)
    for i in range(len(stream)):
        ws.data_received(stream[i : i + 1])
    assert got == messages


async def test_a_partial_header_after_a_big_frame_is_parsed_when_it_completes() -> None:
    # Regression: the byte count awaited for the big frame must not stick to the next one.
    ws, _, got = opened()
    big, small = text("x" * 70_000), text("after")
    ws.data_received(big[:1000])
    ws.data_received(big[1000:] + small[:1])
    ws.data_received(small[1:])
    assert got == ["x" * 70_000, "after"]


async def test_fragments_are_joined_and_a_ping_between_them_is_answered() -> None:
    ws, transport, got = opened()
    ws.data_received(
        server_frame(wsclient.OP_TEXT, b"hel", final=False)
        + server_frame(wsclient.OP_PING, b"p1")
        + server_frame(wsclient.OP_CONTINUATION, b"lo ", final=False)
        + server_frame(wsclient.OP_CONTINUATION, b"world")
    )
    assert got == ["hello world"]
    assert sent(transport) == [(wsclient.OP_PONG, b"p1")]


async def test_a_server_close_is_echoed_and_ends_the_connection_with_its_code() -> None:
    ws, transport, got = opened()
    ws.data_received(text("last") + server_frame(wsclient.OP_CLOSE, (1001).to_bytes(2, "big")))
    assert got == ["last"]
    assert sent(transport) == [(wsclient.OP_CLOSE, (1001).to_bytes(2, "big"))]
    assert transport.closed and await ws.wait_closed() == 1001
    with pytest.raises(ConnectionError):
        ws.send_text(b"{}")


async def test_our_close_waits_for_the_echo() -> None:
    ws, transport, _ = opened()
    closing = asyncio.ensure_future(ws.close(1000, within=5))
    await asyncio.sleep(0)
    assert sent(transport) == [(wsclient.OP_CLOSE, (1000).to_bytes(2, "big"))]
    assert not closing.done()
    ws.data_received(server_frame(wsclient.OP_CLOSE, (1000).to_bytes(2, "big")))
    assert await closing == 1000
    assert len(sent(transport)) == 1  # no second close frame


async def test_a_peer_that_never_echoes_is_cut_after_the_wait() -> None:
    ws, transport, _ = opened()
    assert await ws.close(1000, within=0.05) == wsclient.CLOSE_ABNORMAL
    assert transport.closed


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (server_frame(wsclient.OP_TEXT, b"x", masked=True), 1002),
        (server_frame(wsclient.OP_TEXT, b"\xff\xfe"), 1007),
        (server_frame(wsclient.OP_TEXT, b"y" * 1001), 1009),
        (server_frame(wsclient.OP_BINARY, b"{}"), 1003),
        (bytes((0x80 | 0x40 | 1, 1)) + b"x", 1002),  # RSV1 without an extension
        (server_frame(wsclient.OP_CONTINUATION, b"x"), 1002),
        (server_frame(wsclient.OP_TEXT, b"a", final=False) + text("b"), 1002),
        (server_frame(wsclient.OP_PING, b"x" * 126), 1002),
        (server_frame(wsclient.OP_CLOSE, b"\x03"), 1002),
        (server_frame(0x3, b""), 1002),
    ],
    ids=[
        "masked",
        "not-utf8",
        "too-big",
        "binary",
        "reserved-bit",
        "stray-continuation",
        "interleaved-message",
        "big-ping",
        "one-byte-close",
        "unknown-opcode",
    ],
)
async def test_a_protocol_violation_fails_the_connection_with_its_code(
    data: bytes, code: int
) -> None:
    ws, transport, got = opened(max_message=1000)
    ws.data_received(data + text("never"))
    assert got == []
    assert sent(transport) == [(wsclient.OP_CLOSE, code.to_bytes(2, "big"))]
    assert transport.closed and await ws.wait_closed() == code


async def test_a_failing_handler_fails_the_connection_and_is_raised_on_wait() -> None:
    def handler(t: str) -> None:
        raise ValueError(t)

    ws = WebSocket(b"GET /", KEY, handler, 1 << 20)
    transport = Transport(ws)
    ws.connection_made(transport)  # type: ignore[arg-type]
    ws.data_received(upgrade() + text("boom"))
    with pytest.raises(ValueError, match="boom"):
        await ws.wait_closed()
    assert ws.close_code == 1011


@pytest.mark.parametrize(
    ("response", "status"),
    [
        (b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n", 401),
        (b"HTTP/1.1 429 Too Many Requests\r\n\r\n", 429),
        (upgrade(key="c29tZSBvdGhlciBrZXk="), 101),  # wrong Sec-WebSocket-Accept
        (upgrade(extra="Sec-WebSocket-Extensions: permessage-deflate\r\n"), 101),
        (b"SSH-2.0-OpenSSH\r\n\r\n", 0),
    ],
    ids=["401", "429", "wrong-accept", "extension", "not-http"],
)
async def test_a_refused_handshake_raises_with_the_status(response: bytes, status: int) -> None:
    ws = WebSocket(b"GET /", KEY, lambda t: None, 1 << 20)
    transport = Transport(ws)
    ws.connection_made(transport)  # type: ignore[arg-type]
    ws.data_received(response)
    with pytest.raises(HandshakeError) as refused:
        await ws.handshake
    assert refused.value.status == status
    assert transport.closed


async def test_sent_frames_are_masked_with_the_right_length_form() -> None:
    ws, transport, _ = opened()
    payloads = [b"{}", b"x" * 200, b"y" * 70_000]
    for p in payloads:
        ws.send_text(p)
    assert sent(transport) == [(wsclient.OP_TEXT, p) for p in payloads]


@given(st.binary(min_size=4, max_size=4), st.binary(max_size=300))
def test_mask_is_the_rfc_byte_xor_and_its_own_inverse(key: bytes, payload: bytes) -> None:
    expected = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    assert mask(key, payload) == expected
    assert mask(key, expected) == payload


@given(st.lists(st.text(max_size=200), max_size=8), st.lists(st.integers(1, 400), max_size=20))
def test_any_chunking_delivers_the_same_messages(messages: list[str], cuts: list[int]) -> None:
    async def run() -> list[str]:
        ws, _, got = opened()
        stream, pos = b"".join(text(m) for m in messages), 0
        for cut in cuts:
            ws.data_received(stream[pos : pos + cut])
            pos += cut
        ws.data_received(stream[pos:])
        return got

    assert asyncio.run(run()) == messages


def test_header_values_with_line_breaks_are_refused() -> None:
    async def run() -> Any:
        return await wsclient.connect(
            "ws://127.0.0.1:9/ws", lambda t: None, headers={"X": "a\r\nInjected: 1"}
        )

    with pytest.raises(ValueError, match="line break"):
        asyncio.run(run())
