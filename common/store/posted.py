"""Messages a `service` token posted over HTTP as `assistant` or `system` (SPEC §6).

They are rare next to chats and carry a role the group commit does not take (it
decides the role from the sender's participation), so each gets a transaction of
its own: the same steps as `fanout_write_batch_v1` for one chat — lock the session,
insert once per (session, sender, client id), and on a new message to an open
session restart the TTL and move the status as common/store/lifecycle.py says.
"""

from __future__ import annotations

import uuid

import orjson

from common.store.batch import ChatWritten
from common.store.lifecycle import after_message, is_open
from common.store.postgres import PARTICIPANTS, Store, message_from_row, session_from_row
from common.transport.entries import ChatEntry

POSTED_ROLES = frozenset({"assistant", "system"})

_INSERT = """
INSERT INTO messages (session_id, client_msg_id, role, user_id, device_id, content, metadata)
VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb)
ON CONFLICT (session_id, user_id, client_msg_id) DO NOTHING
RETURNING *
"""
_ACTIVITY = """
UPDATE sessions SET
    last_activity_at = now(),
    expires_at = now() + ttl * interval '1 second',
    status = $2,
    version = version + (status <> $2)::int,
    updated_at = CASE WHEN status <> $2 THEN now() ELSE updated_at END
WHERE id = $1
RETURNING *
"""


async def write_posted(store: Store, entry: ChatEntry) -> ChatWritten | None:
    """Store a posted message once; None if its session is gone."""
    assert entry.role in POSTED_ROLES
    key = uuid.UUID(entry.session_id)
    metadata = orjson.dumps(entry.metadata).decode() if entry.metadata is not None else None
    async with store.acquire() as conn, conn.transaction():
        locked = await conn.fetchrow("SELECT * FROM sessions WHERE id = $1 FOR UPDATE", key)
        if locked is None:
            return None
        row = await conn.fetchrow(
            _INSERT,
            key,
            entry.client_msg_id,
            entry.role,
            entry.user_id,
            entry.device_id,
            entry.content,
            metadata,
        )
        created = row is not None
        if row is None:  # posted before (a retry): the first row stands
            row = await conn.fetchrow(
                "SELECT * FROM messages WHERE session_id = $1 AND user_id = $2"
                " AND client_msg_id = $3",
                key,
                entry.user_id,
                entry.client_msg_id,
            )
            assert row is not None
        after = locked
        if created and is_open(locked["status"]):
            moved = await conn.fetchrow(_ACTIVITY, key, after_message(locked["status"]))
            assert moved is not None
            after = moved
        members = [r["user_id"] for r in await conn.fetch(PARTICIPANTS, key)]
    return ChatWritten(
        before=session_from_row(locked, members),
        session=session_from_row(after, members),
        message=message_from_row(row),
        created=created,
        role=entry.role,
        reply_id=None,
    )
