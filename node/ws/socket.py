"""A client's socket after the upgrade: its frames handled in order, the rate limit, its release.

The socket is a ClientWire (node/ws/wire.py): frames arrive by callback from
`data_received`; those that need awaiting (a chat) wait in a small inbox for a task
that exists only while some wait; a lost socket departs in a task the node owns.
Every frame but a close counts toward the rate limit, PINGs and PONGs too, and a pong
goes out through the connection's bounded send queue (SPEC §4, issue 13).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import Any

from aiohttp import WSMsgType

from common.errors import SERVICE_DOWN
from common.protocol import (
    CloseCode,
    ErrorCode,
    ProtocolError,
    encode,
    error_frame,
    parse_client_frame,
)
from common.wsframe import OP_PONG, frame_header
from node.metrics import frame_kind
from node.state import NodeState
from node.ws.aiohttp_private import close_code_of
from node.ws.connection import Connection, RateLimiter
from node.ws.router import route
from node.ws.wire import Wire

log = logging.getLogger("fanout.node")


class _Refusals:
    """Logs why frames get UNAVAILABLE: at most one line a second (an outage refuses
    every frame of every socket), with how many were refused since the last line."""

    def __init__(self) -> None:
        self._logged_at = 0.0
        self._since = 0

    def note(self, kind: str, exc: BaseException) -> None:
        self._since += 1
        now = time.monotonic()
        if now - self._logged_at >= 1.0:
            log.warning(
                "%d frame(s) refused with UNAVAILABLE, the last a %s: %r", self._since, kind, exc
            )
            self._logged_at, self._since = now, 0


_refusals = _Refusals()

_TEXT, _BINARY, _PING, _CLOSE = WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.PING, WSMsgType.CLOSE


def is_valid_close_code(code: int) -> bool:
    """A close code a peer may send (RFC 6455 §7.4; 0: the close frame had none).

    1005, 1006 and 1015 are for reporting only, never sent; 1004 is reserved.
    """
    return code == 0 or 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


# Client frames waiting for the one before them to be handled (a chat waits for its
# enqueue). Past this the socket is not read until half of them are done: the peer's
# TCP window holds the rest. The rate limit drops frames before they get here.
INBOX_PAUSE = 32
DEPART_POLL = 0.05


class ClientWire(Wire):
    """One client's socket after the upgrade: its frames handled in order, its departure.

    Frames arrive by callback; those that need awaiting (a chat) are handled by a
    task made only while some wait, so an idle socket holds no coroutine at all.
    """

    __slots__ = ("_conn", "_inbox", "_limiter", "_paused", "_settled", "_state", "_worker")

    def __init__(self, state: NodeState, conn: Connection, transport: asyncio.Transport) -> None:
        super().__init__(transport, max_msg_size=state.settings.max_frame)
        self._state = state
        self._conn = conn
        self._limiter: RateLimiter | None = None  # made at the first client frame
        self._inbox: deque[str | bytes] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._paused = False
        # Set once the join is over: from then on a lost socket departs by itself.
        self._settled = False

    def settle(self, joined: bool) -> None:
        """The join is over: read frames from now on (or close, if it failed)."""
        self._settled = True
        conn = self._conn
        if self.is_lost:
            _start_departure(self._state, self)
        elif not joined:
            conn.close(CloseCode.INTERNAL, "could not join")  # no-op if closing
        else:
            self._state.hub.heartbeat.watch(conn, self._state.settings.heartbeat)
            if self._inbox:
                self._start_worker()

    # -- frames in --------------------------------------------------------------------------
    def received(self, msg: Any) -> None:
        conn = self._conn
        conn.heard()
        kind = msg[0]
        if kind == _CLOSE:
            self.peer_closed()  # the answer to our close frame, if we sent one
            code = msg[1]
            conn.closed_by_peer(1000 if is_valid_close_code(code) else CloseCode.PROTOCOL)
            return
        # Every other frame costs the node a parse and (a ping) a write: control frames
        # count toward the rate limit and the flooding rule like any other (SPEC §4).
        if conn.closing or not self._within_rate():
            return
        if kind == _PING:
            # Owed to the peer like any frame: counted toward FANOUT_SEND_QUEUE_BYTES.
            payload = bytes(msg[1])
            conn.send_framed(frame_header(OP_PONG, len(payload)) + payload)
        elif kind in (_TEXT, _BINARY):
            self._queue(msg[1])  # a binary frame (bytes) gets BAD_REQUEST, in its turn

    def _within_rate(self) -> bool:
        """False: the frame is dropped (RATE_LIMIT at most once a second; flooding closes
        1008 and the socket is not read any more)."""
        limiter = self._limiter
        if limiter is None:
            settings = self._state.settings
            limiter = self._limiter = RateLimiter(settings.rate, settings.rate_burst)
        if limiter.allow():
            return True
        conn = self._conn
        self._state.metrics.received("rate_limited")
        if limiter.flooding:
            # A flooder's every frame costs the loop a parse and a callback, even
            # dropped: it is not read any more, and gets its close without a wait for
            # an answer it would send behind the flood.
            self._paused = True
            self.transport.pause_reading()
            conn.close(CloseCode.POLICY, "flooding", wait_for_peer=False)
        elif limiter.should_report():
            conn.send(error_frame(ErrorCode.RATE_LIMIT, "too many frames; slow down"))
        return False

    def failed(self, exc: BaseException) -> None:
        # The reader parses nothing after an error, the peer's close frame included:
        # close without waiting for it.
        self.peer_closed()
        code = close_code_of(exc)
        self._conn.close(code, "frame too big" if code == CloseCode.TOO_BIG else "bad frame")

    def _queue(self, data: str | bytes) -> None:
        if self._inbox is None:
            self._inbox = deque()
        self._inbox.append(data)
        if len(self._inbox) >= INBOX_PAUSE and not self._paused:
            self._paused = True
            self.transport.pause_reading()
        if self._worker is None and self._settled:
            self._start_worker()

    def _start_worker(self) -> None:
        self._worker = asyncio.create_task(self._work(), name=f"frames-{self._conn.conn_id}")

    async def _work(self) -> None:
        """Handle the waiting frames in order, then go (the next frame starts a new task)."""
        inbox, conn = self._inbox, self._conn
        assert inbox is not None
        while inbox and not conn.closing:
            data = inbox.popleft()
            if self._paused and len(inbox) <= INBOX_PAUSE // 2:
                self._paused = False
                if not self.transport.is_closing():
                    self.transport.resume_reading()
            await _handle(self._state, conn, data)
        # Nothing awaited since the inbox was seen empty (or the socket is closing, and
        # what is left is dropped): the next frame finds no inbox and no task.
        self._inbox = self._worker = None

    # -- departure ----------------------------------------------------------------------------
    def lost(self) -> None:
        if self._settled:
            _start_departure(self._state, self)
        # else: the join still runs, and settle() starts the departure when it ends.

    @property
    def connection(self) -> Connection:
        return self._conn

    async def stop(self) -> None:
        """Await the frame task, if one runs: the connection is closing, so it stops
        after the frame in hand (a chat being enqueued is finished, not cut off)."""
        task = self._worker
        if task is not None:
            await asyncio.wait([task])  # a cancellation of the caller's still reaches it


def _start_departure(state: NodeState, wire: ClientWire) -> None:
    """The socket is gone: out of the node's books now, out of the cluster's soon.

    The task is the node's (NodeState.departing): the app's cleanup waits for it.
    """
    conn = wire.connection
    state.metrics.connections_active.dec()
    state.hub.expiry.forget(conn)
    state.hub.heartbeat.forget(conn)
    state.hub.leave(conn)
    task = asyncio.create_task(_depart(state, wire), name=f"depart-{conn.conn_id}")
    state.departing.add(task)
    task.add_done_callback(state.departing.discard)


async def _depart(state: NodeState, wire: ClientWire) -> None:
    await wire.connection.stop()  # closing from here on: the frame task ends after its frame
    await wire.stop()
    await release_device(state, wire.connection)


async def depart_all(state: NodeState, within: float) -> None:
    """Node cleanup: end the sockets still open, wait up to `within` for their departures
    (device release, offline presence) while Redis is still there; cut and cancel the rest.

    Ended, not cut: a socket whose peer has not answered our close yet (it may simply
    not have read it yet) still gets its 1001 before the end; an abort would reset the
    connection and the peer could lose the unread close frame with it.
    """
    for conn in list(state.hub.connections()):
        conn.end()
    await asyncio.sleep(0)  # transports with nothing left to send report connection_lost
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    for _ in range(int(within / DEPART_POLL)):  # polled, like the drain: sockets leave by callback
        if next(state.hub.connections(), None) is None:
            break
        await asyncio.sleep(DEPART_POLL)
    for conn in list(state.hub.connections()):
        conn.cut()  # a peer that does not read: its transport never empties
    await asyncio.sleep(0)
    if state.departing:
        await asyncio.wait(set(state.departing), timeout=max(0.1, deadline - loop.time()))
    left = list(state.departing)
    for task in left:
        task.cancel()
    for task in left:
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _handle(state: NodeState, conn: Connection, data: str | bytes) -> None:
    frame_id: str | None = None
    kind = "invalid"
    try:
        if isinstance(data, bytes):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "binary frames are not accepted: JSON text")
        frame = parse_client_frame(
            data,
            conn.session_id,
            state.settings.max_content,
            max_metadata=state.settings.max_metadata,
        )
        kind = frame_kind(frame)
        frame_id = getattr(frame, "id", None)
        await route(state, conn, frame)
    except ProtocolError as exc:
        conn.send(error_frame(exc.code, exc.message, exc.frame_id))
    except SERVICE_DOWN as exc:
        _refusals.note(kind, exc)
        conn.send(error_frame(ErrorCode.UNAVAILABLE, "backing service unavailable", frame_id))
    except Exception:
        log.exception("frame from %s/%s failed", conn.user_id, conn.device_id)
        conn.send(error_frame(ErrorCode.INTERNAL_ERROR, "internal error", frame_id))
    finally:
        state.metrics.received(kind)


async def announce_presence(state: NodeState, conn: Connection, status: str) -> None:
    frame = encode(
        {
            "type": "presence",
            "user_id": conn.user_id,
            "device_id": conn.device_id,
            "status": status,
        }
    )
    try:
        await state.bus.publish([conn.user_id], frame, skip=(conn.user_id, conn.device_id))
    except SERVICE_DOWN:
        log.warning("presence %s for %s not published: redis unavailable", status, conn.user_id)


async def release_device(state: NodeState, conn: Connection) -> None:
    try:
        if await state.devices.release(conn.user_id, conn.device_id, conn.conn_id):
            await announce_presence(state, conn, "offline")
    except SERVICE_DOWN:
        pass  # the device's lease expires by itself
