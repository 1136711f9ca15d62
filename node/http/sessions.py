"""The sessions HTTP API (SPEC §6): sessions, participants, history and presence.

Who sees what: a participant sees and changes their sessions, an admin every
session; anyone else gets 404 whether or not the session exists. Status changes
follow common/store/lifecycle.py and are applied atomically (common/store/sessions.py): an
illegal one, also one that lost a race, is 409.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from datetime import datetime
from typing import Any

from aiohttp import web

from common.auth import Identity
from common.protocol import (
    MAX_USER_ID,
    InvalidMetadata,
    canonical_session_id,
    check_metadata,
    has_nul,
    is_session_id,
)
from common.store.lifecycle import SETTABLE, STATUSES, Refused
from common.store.postgres import SessionCursor, SessionRecord
from common.store.sessions import SessionChanges, TooManyParticipants
from node.http import schemas
from node.http.base import ApiError, authenticate, json_response, read_body
from node.http.routes import Route
from node.http.schemas import MAX_TTL, PAGE_DEFAULT, PAGE_MAX
from node.state import STATE, NodeState

PATCHABLE = frozenset({"status", "agent", "ttl", "metadata"})
_ONE = "/api/v1/sessions/{session_id}"


def _caller(request: web.Request) -> tuple[NodeState, Identity]:
    state = request.app[STATE]
    return state, authenticate(state, request)


def _bad(message: str) -> ApiError:
    return ApiError(400, "BAD_REQUEST", message)


def _not_found() -> ApiError:
    return ApiError(404, "NOT_FOUND", "no such session")


def _changes(state: NodeState) -> SessionChanges:
    return SessionChanges(state.store, state.bus, state.sessions, state.eraser)


def _user_id(value: Any, name: str) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_USER_ID:
        raise _bad(f"'{name}' must be a user id of 1 to {MAX_USER_ID} characters")
    if has_nul(value):
        raise _bad(f"'{name}' must not contain U+0000")
    return value


def _ttl(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_TTL:
        raise _bad(f"'ttl' must be whole seconds from 1 to {MAX_TTL}")
    return value


def _agent(value: Any) -> str:
    if value not in ("ai", "human"):
        raise _bad("'agent' must be 'ai' or 'human'")
    assert isinstance(value, str)
    return value


def _metadata(state: NodeState, value: Any) -> dict[str, Any]:
    try:
        return check_metadata(value, state.settings.max_metadata)
    except InvalidMetadata as exc:
        raise _bad(str(exc)) from None


def _whole(raw: str) -> int | None:
    """A positive whole number of at most 18 digits (it fits a bigint), else None."""
    if raw.isascii() and raw.isdigit() and len(raw) <= 18 and int(raw) > 0:
        return int(raw)
    return None


def _limit(request: web.Request) -> int:
    limit = _whole(request.query.get("limit", str(PAGE_DEFAULT)))
    if limit is None or limit > PAGE_MAX:
        raise _bad(f"'limit' must be a whole number from 1 to {PAGE_MAX}")
    return limit


def _session_id(request: web.Request) -> str:
    session_id = request.match_info["session_id"]
    if not is_session_id(session_id):
        raise _bad("the session id must be a UUID")
    return canonical_session_id(session_id)


async def _visible(state: NodeState, identity: Identity, session_id: str) -> SessionRecord:
    """The session if the caller may see it; 404 otherwise, existing or not."""
    record = await state.store.get_session(session_id)
    if record is None or not (identity.is_admin or identity.user_id in record.participants):
        raise _not_found()
    return record


async def create_session(request: web.Request) -> web.Response:
    """POST /api/v1/sessions: the caller owns the new, pending session."""
    state, identity = _caller(request)
    body = await read_body(request)
    participants = body.get("participants", [])
    cap = state.settings.max_participants
    if not isinstance(participants, list) or len(participants) > cap:
        raise _bad(f"'participants' must be a list of up to {cap} user ids")
    members = [_user_id(p, "participants") for p in participants]
    if len({identity.user_id, *members}) > cap:
        raise _bad(f"a session has at most {cap} participants, the owner included")
    record = await state.store.create_session(
        owner=identity.user_id,
        participants=members,
        agent=_agent(body.get("agent", "ai")),
        ttl=_ttl(body.get("ttl", state.settings.session_ttl)),
        metadata=_metadata(state, body.get("metadata", {})),
    )
    return json_response(record.to_json(), status=201)


async def list_sessions(request: web.Request) -> web.Response:
    """GET /api/v1/sessions: a page of the caller's sessions (an admin's: all)."""
    state, identity = _caller(request)
    status = request.query.get("status")
    if status is not None and status not in STATUSES:
        raise _bad(f"'status' must be one of {', '.join(sorted(STATUSES))}")
    limit = _limit(request)
    cursor = request.query.get("cursor")
    records = await state.store.list_sessions(
        user_id=None if identity.is_admin else identity.user_id,
        status=status,
        after=_decode_cursor(cursor) if cursor is not None else None,
        limit=limit + 1,
    )
    page = records[:limit]
    more = len(records) > limit
    return json_response(
        {
            "items": [r.to_json() for r in page],
            "next": _encode_cursor(page[-1]) if more else None,
        }
    )


def _encode_cursor(record: SessionRecord) -> str:
    raw = f"{record.created_at.isoformat()}|{record.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> SessionCursor:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, _, session_id = raw.partition("|")
        when = datetime.fromisoformat(created)
        if when.tzinfo is None:
            raise ValueError("naive time")
        return when, uuid.UUID(session_id)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise _bad("'cursor' is not a cursor this API returned") from None


async def get_session(request: web.Request) -> web.Response:
    """GET /api/v1/sessions/{id}."""
    state, identity = _caller(request)
    record = await _visible(state, identity, _session_id(request))
    return json_response(record.to_json())


async def patch_session(request: web.Request) -> web.Response:
    """PATCH /api/v1/sessions/{id}: status, agent, TTL or metadata; 409 if illegal."""
    state, identity = _caller(request)
    session_id = _session_id(request)
    body = await read_body(request)
    unknown = sorted(set(body) - PATCHABLE)
    if unknown:
        raise _bad(f"cannot change {', '.join(unknown)}; only {', '.join(sorted(PATCHABLE))}")
    given = {name: value for name, value in body.items() if value is not None}
    if not given:
        raise _bad("nothing to change: give status, agent, ttl or metadata")
    status = given.get("status")
    if status is not None and status not in SETTABLE:
        raise _bad(f"'status' must be one of {', '.join(sorted(SETTABLE))}")
    agent = _agent(given["agent"]) if "agent" in given else None
    ttl = _ttl(given["ttl"]) if "ttl" in given else None
    metadata = _metadata(state, given["metadata"]) if "metadata" in given else None
    await _visible(state, identity, session_id)
    try:
        record = await _changes(state).update(
            session_id, status=status, agent=agent, ttl=ttl, metadata=metadata
        )
    except Refused as exc:
        raise ApiError(409, "CONFLICT", exc.message) from None
    if record is None:
        raise _not_found()  # deleted since it was read
    return json_response(record.to_json())


async def delete_session(request: web.Request) -> web.Response:
    """DELETE /api/v1/sessions/{id}: the owner or an admin; messages go too."""
    state, identity = _caller(request)
    record = await _visible(state, identity, _session_id(request))
    if not (identity.is_admin or identity.user_id == record.owner):
        raise ApiError(403, "FORBIDDEN", "only the owner or an admin may delete a session")
    if not await _changes(state).delete(record.id):
        raise _not_found()
    return web.Response(status=204)


async def add_participant(request: web.Request) -> web.Response:
    """POST /api/v1/sessions/{id}/participants: an agent joins, or the owner adds someone."""
    state, identity = _caller(request)
    session_id = _session_id(request)
    body = await read_body(request)
    user_id = _user_id(body.get("user_id"), "user_id")
    record = await state.store.get_session(session_id)
    # An agent joining needs only the session's id (from a support queue, say).
    agent_joins = identity.is_agent and user_id == identity.user_id
    member = record is not None and identity.user_id in record.participants
    if record is None or not (agent_joins or member or identity.is_admin):
        raise _not_found()
    if not (agent_joins or identity.is_admin or identity.user_id == record.owner):
        raise ApiError(403, "FORBIDDEN", "only the owner adds participants; agents join themselves")
    try:
        joined = await _changes(state).add_participant(
            session_id,
            user_id,
            role="agent" if agent_joins else "user",
            cap=state.settings.max_participants,
        )
    except Refused as exc:
        raise ApiError(409, "SESSION_CLOSED", exc.message) from None
    except TooManyParticipants as exc:
        raise ApiError(409, "TOO_MANY_PARTICIPANTS", exc.message) from None
    if joined is None:
        raise _not_found()
    return json_response(joined.to_json())


async def list_messages(request: web.Request) -> web.Response:
    """GET /api/v1/sessions/{id}/messages: a page of history, newest first."""
    state, identity = _caller(request)
    session_id = _session_id(request)
    limit = _limit(request)
    before_raw = request.query.get("before")
    before = _whole(before_raw) if before_raw is not None else None
    if before_raw is not None and before is None:
        raise _bad("'before' is not a cursor this API returned")
    await _visible(state, identity, session_id)
    rows = await state.store.messages(session_id, before=before, limit=limit + 1)
    page = rows[:limit]
    return json_response(
        {
            "items": [m.to_json() for m in page],
            # The cursor is the oldest id shown: the next page has only older messages,
            # so messages arriving meanwhile never shift a page or appear twice.
            "next": str(page[-1].id) if len(rows) > limit else None,
        }
    )


async def presence(request: web.Request) -> web.Response:
    """GET /api/v1/presence/{user_id}: the user's live devices across the cluster."""
    state, identity = _caller(request)
    user_id = request.match_info["user_id"]
    if len(user_id) > MAX_USER_ID:
        raise _bad(f"a user id has at most {MAX_USER_ID} characters")
    if not (user_id == identity.user_id or identity.is_agent or identity.is_admin):
        raise ApiError(403, "FORBIDDEN", "only the user, agents and admins see presence")
    devices = await state.devices.online(user_id)
    return json_response({"user_id": user_id, "online": bool(devices), "devices": devices})


_SESSIONS = ("sessions",)
ROUTES = (
    Route(
        "POST",
        "/api/v1/sessions",
        create_session,
        "Create a session",
        _SESSIONS,
        status=201,
        body=schemas.NewSession,
        response=schemas.Session,
    ),
    Route(
        "GET",
        "/api/v1/sessions",
        list_sessions,
        "The caller's sessions (an admin's: all), newest first",
        _SESSIONS,
        query=schemas.SessionQuery,
        response=schemas.SessionPage,
    ),
    Route(
        "GET",
        _ONE,
        get_session,
        "A session",
        _SESSIONS,
        response=schemas.Session,
        errors=(400, 404),
    ),
    Route(
        "PATCH",
        _ONE,
        patch_session,
        "Change status (SPEC §5 transitions), agent, TTL or metadata",
        _SESSIONS,
        body=schemas.SessionChange,
        response=schemas.Session,
        errors=(404, 409),
    ),
    Route(
        "DELETE",
        _ONE,
        delete_session,
        "Delete a session and its messages",
        _SESSIONS,
        status=204,
        errors=(400, 403, 404),
    ),
    Route(
        "POST",
        _ONE + "/participants",
        add_participant,
        "An agent joins (user_id = self), or the owner adds someone",
        _SESSIONS,
        body=schemas.Participant,
        response=schemas.Session,
        errors=(403, 404, 409),
    ),
    Route(
        "GET",
        _ONE + "/messages",
        list_messages,
        "History, newest first",
        _SESSIONS,
        query=schemas.MessageQuery,
        response=schemas.MessagePage,
        errors=(404,),
    ),
    Route(
        "GET",
        "/api/v1/presence/{user_id}",
        presence,
        "A user's online devices (self, agents, admins)",
        ("presence",),
        response=schemas.Presence,
        errors=(400, 403),
    ),
)
