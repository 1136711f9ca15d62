"""Messages posted over HTTP, for backends, bots and agent desks (SPEC §6).

The same validation, idempotency (`client_msg_id`) and path as a `chat` frame: the
body is checked by the frame parser, the entry goes to the session's partition
stream, and 202 means it is there (durably enqueued); the worker stores it once.
A participant posts as themself (`user`, or `agent` for an agent); a `service` token
posts into any session as `assistant` or `system`.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from aiohttp import web

from common.protocol import Chat, ErrorCode, ProtocolError, parse_client_frame
from common.store.posted import POSTED_ROLES
from common.transport.entries import ChatEntry
from common.transport.keys import partition_of
from node.http import schemas
from node.http.base import ApiError, json_response, read_body
from node.http.routes import Route
from node.http.sessions import _caller, _metadata, _not_found, _session_id
from node.state import NodeState

# Messages posted over HTTP carry this device id (the column says where one came from).
HTTP_DEVICE = "http"
_STATUS = {ErrorCode.MSG_TOO_LARGE: 413}
_FIELDS = frozenset({"client_msg_id", "content", "metadata", "role"})


def _chat(state: NodeState, session_id: str, body: dict[str, Any]) -> Chat:
    """The body as a `chat` frame, validated by the frame parser itself."""
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise ApiError(400, "BAD_REQUEST", f"unknown field {', '.join(unknown)}")
    if body.get("metadata") is not None:
        # Checked before the frame is encoded again: metadata nested past what orjson
        # encodes would otherwise fail there (a 500), not in the parser (a 400).
        _metadata(state, body["metadata"])
    frame = {
        "type": "chat",
        "id": body.get("client_msg_id"),
        "session_id": session_id,
        "content": body.get("content"),
        "metadata": body.get("metadata"),
    }
    try:
        parsed = parse_client_frame(
            orjson.dumps(frame),
            None,
            state.settings.max_content,
            max_metadata=state.settings.max_metadata,
        )
    except ProtocolError as exc:
        message = exc.message.replace("'id'", "'client_msg_id'")
        raise ApiError(_STATUS.get(exc.code, 400), exc.code.value, message) from None
    assert isinstance(parsed, Chat)
    return parsed


async def post_message(request: web.Request) -> web.Response:
    """POST /api/v1/sessions/{id}/messages: 202 once durably enqueued."""
    state, identity = _caller(request)
    session_id = _session_id(request)
    body = await read_body(request)
    chat = _chat(state, session_id, body)
    role = body.get("role")
    if role is not None and role not in ("user", "agent", *POSTED_ROLES):
        raise ApiError(400, "BAD_REQUEST", "'role' must be user, agent, assistant or system")
    access = await state.sessions.lookup(session_id)
    posted_role: str | None = None
    if identity.is_service:
        # A service speaks for the assistant or the system, never for a person.
        if role not in (None, *POSTED_ROLES):
            raise ApiError(403, "FORBIDDEN", "a service posts as assistant or system")
        posted_role = role or "assistant"
        if access is None:
            raise _not_found()
    else:
        if access is None or identity.user_id not in access.participants:
            raise _not_found()
        if role in POSTED_ROLES or (role == "agent" and not identity.is_agent):
            raise ApiError(403, "FORBIDDEN", f"only a service token posts as {role}")
    if not access.is_open:
        raise ApiError(409, "SESSION_CLOSED", f"session is {access.status}")
    if not identity.is_service:  # a service is the deployment's own backend
        crowded = await state.peers.refused(identity.user_id, access.participants)
        if crowded is not None:
            raise ApiError(429, "RATE_LIMIT", f"too many messages to {crowded[:64]!r}; retry later")
    entry = ChatEntry(
        session_id=session_id,
        client_msg_id=chat.id,
        user_id=identity.user_id,
        device_id=HTTP_DEVICE,
        content=chat.content,
        metadata=chat.metadata,
        accepted_ms=int(time.time() * 1000),
        role=posted_role,
    )
    await state.bus.enqueue(partition_of(session_id, state.settings.partitions), entry.encode())
    return json_response({"client_msg_id": chat.id, "session_id": session_id}, status=202)


ROUTES = (
    Route(
        "POST",
        "/api/v1/sessions/{session_id}/messages",
        post_message,
        "Post a message: a participant as itself, a service token as assistant or system",
        ("sessions",),
        status=202,
        body=schemas.NewMessage,
        response=schemas.Accepted,
        errors=(403, 404, 409, 413, 429),
    ),
)
