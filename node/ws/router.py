"""What each client frame does once it has been validated (SPEC §4)."""

from __future__ import annotations

import time

from common.auth import AuthError
from common.protocol import (
    Auth,
    Chat,
    ClientFrame,
    CloseCode,
    ErrorCode,
    Ping,
    ProtocolError,
    Read,
    Typing,
    encode,
)
from common.store.sessions import SessionAccess
from common.transport.entries import ChatEntry
from common.transport.keys import partition_of
from node.state import NodeState
from node.ws.connection import Connection

PONG = encode({"type": "pong"})


async def route(state: NodeState, conn: Connection, frame: ClientFrame) -> None:
    """Carry out one client frame; ProtocolError becomes an `error` frame upstream."""
    if isinstance(frame, Ping):
        conn.send(PONG)
    elif isinstance(frame, Chat):
        await _chat(state, conn, frame)
    elif isinstance(frame, Auth):
        _reauthenticate(state, conn, frame.token)
    elif isinstance(frame, Typing):
        access = await _participant(state, conn, frame.session_id, None)
        typing = encode(
            {
                "type": "typing",
                "session_id": frame.session_id,
                "user_id": conn.user_id,
                "device_id": conn.device_id,
                "is_typing": frame.is_typing,
            }
        )
        await state.bus.publish(access.participants, typing, skip=(conn.user_id, conn.device_id))
    elif isinstance(frame, Read):
        await _participant(state, conn, frame.session_id, None)
        body = encode(
            {
                "type": "read",
                "session_id": frame.session_id,
                "message_id": frame.message_id,
            }
        )
        await state.bus.deliver([conn.user_id], body[1:])


def _reauthenticate(state: NodeState, conn: Connection, token: str) -> None:
    """Replace the connection's token (SPEC §4 `auth`): its expiry moves to the new `exp`."""
    try:
        identity = state.verifier.verify(token)
    except AuthError as exc:
        # The old token stays in force until it expires (the expiry timer still holds it).
        raise ProtocolError(ErrorCode.BAD_TOKEN, str(exc)) from None
    if conn.closing:
        return  # departing: its expiry must not be watched again
    if identity.user_id != conn.user_id:
        conn.close(CloseCode.POLICY, "token for another user")
        return
    state.hub.expiry.forget(conn)
    conn.expires_at = identity.expires_at
    state.hub.expiry.watch(conn)
    conn.send(encode({"type": "auth", "expires_at": identity.expires_at}))


async def _participant(
    state: NodeState, conn: Connection, session_id: str, frame_id: str | None
) -> SessionAccess:
    access = await state.sessions.lookup(session_id)
    if access is None:
        raise ProtocolError(ErrorCode.NOT_FOUND, "no such session", frame_id)
    if conn.user_id not in access.participants:
        raise ProtocolError(ErrorCode.FORBIDDEN, "not a participant of this session", frame_id)
    return access


async def _chat(state: NodeState, conn: Connection, frame: Chat) -> None:
    access = await _participant(state, conn, frame.session_id, frame.id)
    if not access.is_open:
        raise ProtocolError(ErrorCode.SESSION_CLOSED, f"session is {access.status}", frame.id)
    crowded = await state.peers.refused(conn.user_id, access.participants)
    if crowded is not None:
        raise ProtocolError(
            ErrorCode.RATE_LIMIT, f"too many messages to {crowded[:64]!r}; retry later", frame.id
        )
    entry = ChatEntry(
        session_id=frame.session_id,
        client_msg_id=frame.id,
        user_id=conn.user_id,
        device_id=conn.device_id,
        content=frame.content,
        metadata=frame.metadata,
        accepted_ms=int(time.time() * 1000),
    )
    # The ack means durably enqueued: it is sent only once XADD has returned. A retry
    # of the same id is enqueued again; the worker stores it once and re-acks nothing.
    partition = partition_of(frame.session_id, state.settings.partitions)
    await state.bus.enqueue(partition, entry.encode())
    conn.send(encode({"type": "ack", "id": frame.id, "session_id": frame.session_id}))
