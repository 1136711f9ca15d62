"""GET /ws: authenticate before the upgrade, then one receive loop per socket (SPEC §4)."""

from __future__ import annotations

import functools
import logging
import time
import uuid

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
from node.connection import DIRECT_WRITES, Connection, RateLimiter
from node.metrics import frame_kind
from node.router import route
from node.state import STATE, NodeState

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

# What `async for msg in ws` stops at.
_CLOSED = (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED)


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
    """A socket's life: admitted, upgraded, joined, read until it closes, released."""
    state = request.app[STATE]
    admitted = await _admit(state, request)
    if isinstance(admitted, web.Response):
        return admitted
    conn, came_online, last_seq = admitted
    metrics, hub = state.metrics, state.hub
    try:
        await conn.ws.prepare(request)
        metrics.connections_total.inc()
        metrics.connections_active.inc()
        hub.expiry.watch(conn)
        try:
            if await _join(state, conn, came_online, last_seq):
                if DIRECT_WRITES:  # from now on the loop below reads the pongs
                    hub.heartbeat.watch(conn, state.settings.heartbeat)
                # Read here rather than in a coroutine of its own: a node holds
                # thousands of sockets, and each coroutine held costs ~0.3 KiB.
                limiter: RateLimiter | None = None  # made at the first client frame
                while not conn.closing:
                    msg = await conn.ws.receive()
                    if msg.type in _CLOSED:
                        break
                    conn.heard()
                    if msg.type == WSMsgType.PING:
                        await conn.ws.pong(msg.data)
                    elif msg.type == WSMsgType.TEXT or msg.type == WSMsgType.BINARY:
                        if limiter is None:
                            limiter = RateLimiter(state.settings.rate, state.settings.rate_burst)
                        if _within_rate(state, conn, limiter):
                            await _handle(state, conn, msg.data)
        finally:
            metrics.connections_active.dec()
            hub.expiry.forget(conn)
            hub.heartbeat.forget(conn)
    finally:
        hub.leave(conn)
        await conn.stop()
        await _release(state, conn)
    return conn.ws


async def _admit(
    state: NodeState, request: web.Request
) -> web.Response | tuple[Connection, bool, int | None]:
    """Checks before the upgrade: a refusal, or the connection, whether the user just
    came online, and the `last_seq` to resume from.

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

    # The node runs the heartbeat itself (node.timers.Heartbeat, one timer for all
    # sockets), so it answers pings too; aiohttp's costs a timer per socket.
    ws = web.WebSocketResponse(
        heartbeat=None if DIRECT_WRITES else state.settings.heartbeat,
        autoping=not DIRECT_WRITES,
        max_msg_size=state.settings.max_frame,
        compress=False,
    )
    conn = Connection(
        ws,
        request.transport,
        conn_id=conn_id,
        user_id=identity.user_id,
        device_id=device_id,
        session_id=session_id,
        queue_limit=state.settings.send_queue_bytes,
        expires_at=identity.expires_at,
        hooks=state.connection_hooks,
    )
    return conn, claim == 1, last_seq


async def _join(
    state: NodeState, conn: Connection, came_online: bool, last_seq: int | None
) -> bool:
    """Welcome (and resume) the connection and add it to its user; False if it was closed."""
    conn.start()
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
