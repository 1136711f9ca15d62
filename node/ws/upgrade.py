"""GET /ws: authenticate before the upgrade, upgrade, welcome; then node/ws/socket.py (SPEC §4)."""

from __future__ import annotations

import functools
import logging
import uuid

from aiohttp import web

from common.auth import AuthError
from common.errors import SERVICE_DOWN
from common.protocol import (
    CloseCode,
    canonical_session_id,
    encode,
    is_session_id,
    is_valid_device_id,
)
from node.delivery.control import replace
from node.state import STATE, NodeState
from node.ws.aiohttp_private import take_upgrade_tail
from node.ws.connection import Connection
from node.ws.socket import ClientWire, announce_presence, release_device

log = logging.getLogger("fanout.node")

# Seqs are JSON numbers for clients: integers up to 2^53 survive a JavaScript double.
MAX_SEQ = 2**53
MAX_SEQ_DIGITS = len(str(MAX_SEQ))


def refuse(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def bearer_token(request: web.Request, *, allow_query: bool) -> str | None:
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip()
    return request.query.get("token") if allow_query else None


def parse_last_seq(raw: str) -> int | None:
    """`last_seq` as ASCII digits up to 2^53 (SPEC §4), else None.

    Not `str.isdigit`: it takes '²' and '①', which `int` then refuses.
    """
    if not 1 <= len(raw) <= MAX_SEQ_DIGITS or not raw.isascii() or not raw.isdigit():
        return None
    value = int(raw)
    return value if value <= MAX_SEQ else None


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
        # Taken before `prepare` gives aiohttp's own frame parser what it holds.
        tail = take_upgrade_tail(request)
        await ws.prepare(request)
        transport = request.transport
        if transport is None:
            raise ConnectionResetError("connection lost during the upgrade")
    except BaseException:
        await release_device(state, conn)
        raise
    wire = ClientWire(state, conn, transport)
    wire.take_over(request)
    conn.attach(wire)
    wire.feed_tail(tail)  # its chat frames wait for the join, like any early frame
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
        last_seq = parse_last_seq(last_seq_raw)
        if last_seq is None:
            return refuse(400, "BAD_REQUEST", "last_seq must be an integer from 0 to 2^53")

    conn_id = uuid.uuid4().hex
    try:
        claim = await state.devices.claim(identity.user_id, device_id, conn_id)
    except SERVICE_DOWN:
        return refuse(503, "UNAVAILABLE", "backing service unavailable; retry")
    if claim.refused:
        metrics.refused_total.labels("429").inc()
        return refuse(429, "TOO_MANY_DEVICES", "the user has the maximum devices connected")
    if claim.replaced is not None:
        # One connection per (user, device): the older one goes (SPEC §4).
        await replace(state, identity.user_id, claim.replaced)

    # Only the handshake is aiohttp's (no permessage-deflate: a compressor per socket);
    # the node runs the heartbeat itself (node.ws.timers.Heartbeat, one timer for all).
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
    return conn, claim.came_online, last_seq, ws


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
        await announce_presence(state, conn, "online")
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
