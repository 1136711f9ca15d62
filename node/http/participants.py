"""Removing a participant, or leaving a session (SPEC §6).

The owner or an admin removes anyone but the owner; a participant removes themself.
The owner cannot leave (they delete the session instead): 409. Adding is capped at
FANOUT_MAX_PARTICIPANTS (node/http/sessions.py), and a removal frees a place.
"""

from __future__ import annotations

from aiohttp import web

from common.store.sessions import NotParticipant, OwnerStays
from node.http.base import ApiError
from node.http.routes import Route
from node.http.sessions import _caller, _changes, _not_found, _session_id, _visible


async def remove_participant(request: web.Request) -> web.Response:
    """DELETE /api/v1/sessions/{id}/participants/{user_id}: remove, or leave; 204."""
    state, identity = _caller(request)
    session_id = _session_id(request)
    user_id = request.match_info["user_id"]
    record = await _visible(state, identity, session_id)
    leaving = user_id == identity.user_id
    if not (leaving or identity.is_admin or identity.user_id == record.owner):
        raise ApiError(403, "FORBIDDEN", "only the owner or an admin removes others")
    try:
        removed = await _changes(state).remove_participant(session_id, user_id)
    except OwnerStays as exc:
        raise ApiError(409, "CONFLICT", str(exc)) from None
    except NotParticipant:
        raise ApiError(404, "NOT_FOUND", "no such participant") from None
    if removed is None:
        raise _not_found()  # deleted since it was read
    return web.Response(status=204)


ROUTES = (
    Route(
        "DELETE",
        "/api/v1/sessions/{session_id}/participants/{user_id}",
        remove_participant,
        "The owner or an admin removes a participant; a participant leaves (user_id = self)",
        ("sessions",),
        status=204,
        errors=(400, 403, 404, 409),
    ),
)
