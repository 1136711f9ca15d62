"""A socket after its upgrade: the transport's own protocol, frames in by callback.

aiohttp keeps a request for the whole life of a WebSocket: the parsed request (headers,
URL, payload), its RequestHandler and HTTP parser, two tasks and the coroutine chain of
the handler waiting in `receive()` — about 12 KB per socket, and a node holds
thousands, almost all idle. So aiohttp does the handshake (`WebSocketResponse.prepare`)
and then the socket is taken over: the transport is handed to a `Wire`, aiohttp's
request handling ends, and what stays per socket is the transport, aiohttp's frame
parser (`WebSocketReader`), the Wire and the node's Connection.

Frames out are written here, framed by common/wsframe.py (a message's frame is made
once, for all its sockets); frames in are parsed by aiohttp's reader and handed to
`received`/`failed` synchronously, from `data_received`.

What aiohttp's reader lets through and RFC 6455 does not, the Wire refuses: an
unmasked client frame (node/ws/maskcheck.py, close 1002). Frames the client sent
behind the upgrade request, before the take-over, are fed to the Wire first
(`feed_tail`).

The take-over uses aiohttp internals, all of them behind node/ws/aiohttp_private.py
(aiohttp's version pinned; tests/transport/test_aiohttp_private.py checks what is relied on).
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from common.wsframe import frame_header
from node.ws.aiohttp_private import MessageRelay, frame_reader, release_request, stream_error
from node.ws.maskcheck import MaskCheck

_CLOSE_CODE = struct.Struct("!H")


class _Dispatch(MessageRelay):
    """The readers' destination, shared by every socket.

    aiohttp's reader hands each parsed message to its queue synchronously, inside the
    `feed_data` that `Wire.data_received` calls, so one queue knows which socket a
    message is for (`current`) and passes it straight on. A queue of its own per
    socket would hold a deque and its bound methods (~0.8 KB) that stay empty.
    """

    current: Wire | None = None

    def message(self, msg: Any) -> None:
        wire = self.current
        if wire is not None:
            wire.received(msg)

    def error(self, exc: BaseException) -> None:
        wire = self.current
        if wire is not None:
            wire.stream_failed(exc)


_dispatch: _Dispatch | None = None


def _shared_dispatch() -> _Dispatch:
    global _dispatch
    if _dispatch is None:
        _dispatch = _Dispatch()
    return _dispatch


class Wire(asyncio.Protocol):
    """The transport's protocol once the upgrade is done.

    Subclasses say what a message (`received`), a broken stream (`failed`) and the
    end of the connection (`lost`) mean. Writes are synchronous; `drain` waits while
    the transport is over its high-water mark.
    """

    __slots__ = (
        "_closed_by_peer",
        "_lost",
        "_masks",
        "_peer_closing",
        "_reader",
        "_unpaused",
        "transport",
    )

    def __init__(self, transport: asyncio.Transport, *, max_msg_size: int) -> None:
        self.transport = transport
        # aiohttp's reader refuses a message of `max_msg_size` bytes already; the node's
        # limit is inclusive (SPEC §4: a frame of exactly FANOUT_MAX_FRAME is accepted).
        self._reader = frame_reader(_shared_dispatch(), max_msg_size + 1)
        self._masks: MaskCheck | None = MaskCheck()
        self._lost = False
        # Made only while a writer waits on flow control, or a close waits for the peer.
        self._unpaused: asyncio.Future[None] | None = None
        self._closed_by_peer: asyncio.Future[None] | None = None
        self._peer_closing = False

    def take_over(self, request: web.Request) -> None:
        """Move the upgraded socket from aiohttp's request handler to this protocol.

        aiohttp's handler lets go of the transport without closing it
        (aiohttp_private.release_request); its request ends as if the client had left,
        its return value is written nowhere, and the code after this still runs.
        """
        self.transport.set_protocol(self)
        release_request(request)

    def feed_tail(self, tail: bytes) -> None:
        """Frames the client sent right behind the upgrade request, in the same read
        (node/ws/aiohttp_private.take_upgrade_tail): parsed as if they came now."""
        if tail:
            self.data_received(tail)

    # -- asyncio.Protocol -------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        masks = self._masks
        if masks is None:
            return  # the stream failed: nothing after it is parsed
        unmasked = masks.first_unmasked(data)
        if unmasked >= 0:
            data = data[:unmasked]  # the frames before it still count
        dispatch = _shared_dispatch()
        outer, dispatch.current = dispatch.current, self
        try:
            if data:
                self._reader.feed_data(data)
        finally:
            dispatch.current = outer
        if unmasked >= 0 and self._masks is not None:
            self.stream_failed(stream_error(WSCloseCode.PROTOCOL_ERROR, "unmasked client frame"))

    def stream_failed(self, exc: BaseException) -> None:
        """The stream cannot be parsed past this point: nothing more is read from it."""
        self._masks = None
        self.failed(exc)

    def eof_received(self) -> bool | None:
        return None  # close the transport: a WebSocket has no half-closed state

    def pause_writing(self) -> None:
        if self._unpaused is None:
            self._unpaused = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        self._wake_writer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._lost = True
        self._wake_writer()
        self.peer_closed()
        self.lost()

    # -- hooks ----------------------------------------------------------------------------
    def received(self, msg: Any) -> None:
        """A parsed message: aiohttp's WSMessage (type, data, extra)."""

    def failed(self, exc: BaseException) -> None:
        """The peer's stream cannot be parsed (a WebSocketError has the close code)."""

    def lost(self) -> None:
        """The connection is gone."""

    # -- writing --------------------------------------------------------------------------
    @property
    def is_lost(self) -> bool:
        return self._lost

    def write(self, opcode: int, payload: bytes) -> None:
        """One unfragmented frame; dropped once the connection is lost or closing."""
        self.write_framed(frame_header(opcode, len(payload)) + payload)

    def write_framed(self, data: bytes) -> None:
        """Bytes that are whole frames already (common/wsframe.py), written as they are."""
        if not self._lost and not self.transport.is_closing():
            self.transport.write(data)

    def write_close(self, code: int, reason: str) -> None:
        self.write(int(WSMsgType.CLOSE), _CLOSE_CODE.pack(code) + reason.encode()[:123])

    async def drain(self) -> None:
        """Wait while the transport holds more than its high-water mark."""
        while self._unpaused is not None and not self._lost:
            await asyncio.shield(self._unpaused)

    def _wake_writer(self) -> None:
        waiter, self._unpaused = self._unpaused, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- closing --------------------------------------------------------------------------
    def peer_closed(self) -> None:
        """The peer's close frame came (or the connection is gone): a close may finish."""
        self._peer_closing = True
        waiter, self._closed_by_peer = self._closed_by_peer, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait_peer_closed(self) -> None:
        if self._lost or self._peer_closing:
            return
        if self._closed_by_peer is None:
            self._closed_by_peer = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._closed_by_peer)
