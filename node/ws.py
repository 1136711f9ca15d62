"""GET /ws: authenticate before the upgrade, then the socket's frames by callback (SPEC §4)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections import deque
from typing import Any

from aiohttp import WSMsgType, web

from common.auth import AuthError
from common.errors import SERVICE_DOWN
from common.protocol import (
    CloseCode,
    ErrorCode,
    ProtocolError,
    canonical_session_id,
    encode,
    error_frame,
    is_session_id,
    is_valid_device_id,
    parse_client_frame,
)
from node.connection import Connection, RateLimiter
from node.metrics import frame_kind
from node.router import route
from node.state import STATE, NodeState
from node.wire import Wire, close_code_of

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

_TEXT, _BINARY, _PING, _PONG, _CLOSE = (
    WSMsgType.TEXT,
    WSMsgType.BINARY,
    WSMsgType.PING,
    int(WSMsgType.PONG),
    WSMsgType.CLOSE,
)

# Client frames waiting for the one before them to be handled (a chat waits for its
# enqueue). Past this the socket is not read until half of them are done: the peer's
# TCP window holds the rest. The rate limit drops frames before they get here.
INBOX_PAUSE = 32
DEPART_POLL = 0.05


def refuse(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def bearer_token(request: web.Request, *, allow_query: bool) -> str | None:
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return request.query.get("token") if allow_query else None


def origin_allowed(state: NodeState, request: web.Request) -> bool:
    allowed = state.settings.allowed_origins
    origin = request.headers.get("Origin")
    return allowed is None or origin is None or origin.rstrip("/") in allowed


async def websocket(request: web.Request) -> web.StreamResponse:
    """Admit, upgrade, hand the socket to a ClientWire, welcome it; the request ends there."""
    state = request.app[STATE]
    admitted = await _admit(state, request)
    if isinstance(admitted, web.Response):
        return admitted
    conn, came_online, last_seq, ws = admitted
    try:
        await ws.prepare(request)
        transport = request.transport
        if transport is None:
            raise ConnectionResetError("connection lost during the upgrade")
    except BaseException:
        await _release(state, conn)
        raise
    wire = ClientWire(state, conn, transport)
    wire.take_over(request)
    conn.attach(wire)
    state.metrics.connections_total.inc()
    state.metrics.connections_active.inc()
    state.hub.expiry.watch(conn)
    joined = False
    try:
        joined = await _join(state, conn, came_online, last_seq)
    finally:
        wire.settle(joined)
    # Nothing is written: the transport is the wire's now (see ClientWire.take_over).
    return web.Response()


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
        if kind in (_TEXT, _BINARY):
            if conn.closing:
                return
            if self._limiter is None:
                settings = self._state.settings
                self._limiter = RateLimiter(settings.rate, settings.rate_burst)
            if _within_rate(self._state, conn, self._limiter):
                self._queue(msg[1])
        elif kind == _PING:
            if not conn.closing:
                self.write(_PONG, msg[1])
        elif kind == _CLOSE:
            self.peer_closed()  # the answer to our close frame, if we sent one
            conn.closed_by_peer()

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
        """Cancel and await the frame task, if one runs."""
        task = self._worker
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


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
    await wire.stop()
    await wire.connection.stop()
    await _release(state, wire.connection)


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


async def _admit(
    state: NodeState, request: web.Request
) -> web.Response | tuple[Connection, bool, int | None, web.WebSocketResponse]:
    """Checks before the upgrade: a refusal, or the connection, whether the user just
    came online, the `last_seq` to resume from and the response that does the upgrade.

    What it needs only to decide (the token's claims, the query) goes with it, not held
    for the life of the socket.
    """
    metrics = state.metrics
    if state.draining:
        return refuse(503, "UNAVAILABLE", "node is draining; connect to another node")
    if not origin_allowed(state, request):
        metrics.refused_total.labels("403").inc()
        return refuse(403, "FORBIDDEN", "origin not allowed")
    try:
        identity = state.verifier.verify(bearer_token(request, allow_query=True))
    except AuthError as exc:
        metrics.refused_total.labels("401").inc()
        return refuse(401, "UNAUTHORIZED", str(exc))
    device_id = request.query.get("device_id", "")
    if not is_valid_device_id(device_id):
        return refuse(400, "BAD_REQUEST", "device_id must be 1-64 chars of [A-Za-z0-9._-]")
    session_id = request.query.get("session_id")
    if session_id is not None and not is_session_id(session_id):
        return refuse(400, "BAD_REQUEST", "session_id must be a UUID")
    if session_id is not None:
        session_id = canonical_session_id(session_id)
    last_seq_raw = request.query.get("last_seq")
    last_seq = None
    if last_seq_raw is not None:
        if not last_seq_raw.isdigit():
            return refuse(400, "BAD_REQUEST", "last_seq must be a non-negative integer")
        last_seq = int(last_seq_raw)

    conn_id = uuid.uuid4().hex
    try:
        claim = await state.devices.claim(identity.user_id, device_id, conn_id)
    except SERVICE_DOWN:
        return refuse(503, "UNAVAILABLE", "backing service unavailable; retry")
    if claim < 0:
        metrics.refused_total.labels("429").inc()
        return refuse(429, "TOO_MANY_DEVICES", "the user has the maximum devices connected")

    # Only the handshake is aiohttp's (no permessage-deflate: a compressor per socket);
    # the node runs the heartbeat itself (node.timers.Heartbeat, one timer for all).
    ws = web.WebSocketResponse(heartbeat=None, compress=False)
    conn = Connection(
        conn_id=conn_id,
        user_id=identity.user_id,
        device_id=device_id,
        session_id=session_id,
        queue_limit=state.settings.send_queue_bytes,
        expires_at=identity.expires_at,
        hooks=state.connection_hooks,
    )
    return conn, claim == 1, last_seq, ws


async def _join(
    state: NodeState, conn: Connection, came_online: bool, last_seq: int | None
) -> bool:
    """Welcome (and resume) the connection and add it to its user; False if it was closed."""
    try:
        await state.hub.join(conn, functools.partial(_welcome, state, conn), last_seq)
    except SERVICE_DOWN:
        conn.close(CloseCode.TRY_AGAIN, "backing service unavailable")
        return False
    if came_online:
        await _presence(state, conn, "online")
    return True


def _welcome(state: NodeState, conn: Connection, newest: int) -> None:
    conn.send(
        encode(
            {
                "type": "welcome",
                "connection_id": conn.conn_id,
                "node_id": state.settings.node_id,
                "user_id": conn.user_id,
                "device_id": conn.device_id,
                "last_seq": newest,
                "heartbeat": state.settings.heartbeat,
            }
        )
    )


def _within_rate(state: NodeState, conn: Connection, limiter: RateLimiter) -> bool:
    """False: the frame is dropped (RATE_LIMIT at most once a second; flooding closes 1008)."""
    if limiter.allow():
        return True
    state.metrics.received("rate_limited")
    if limiter.flooding:
        conn.close(CloseCode.POLICY, "flooding")
    elif limiter.should_report():
        conn.send(error_frame(ErrorCode.RATE_LIMIT, "too many frames; slow down"))
    return False


async def _handle(state: NodeState, conn: Connection, data: str | bytes) -> None:
    frame_id: str | None = None
    kind = "invalid"
    try:
        frame = parse_client_frame(data, conn.session_id, state.settings.max_content)
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


async def _presence(state: NodeState, conn: Connection, status: str) -> None:
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


async def _release(state: NodeState, conn: Connection) -> None:
    try:
        if await state.devices.release(conn.user_id, conn.device_id, conn.conn_id):
            await _presence(state, conn, "offline")
    except SERVICE_DOWN:
        pass  # the device's lease expires by itself
