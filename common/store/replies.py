"""What reply generation reads and writes besides the group commit (SPEC §10).

The context a model sees (a session's last messages, oldest first), the state the
reply watcher polls (is the session still taking a reply?), and the replies that are
not plain ones: an interrupted reply or a `system` error message, which carry
metadata and are rare, so they get an INSERT of their own instead of the batch.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import orjson

from common.store.postgres import MessageRecord, Store, message_from_row

# Roles as a chat-completions model knows them: people in the session speak as the
# user, the assistant's own replies as the assistant; `system` rows (error notes) are
# fanout's own and not part of the conversation.
MODEL_ROLES = {"user": "user", "agent": "user", "assistant": "assistant"}


@dataclass(frozen=True, slots=True)
class Turn:
    """One message of the context a model is given."""

    role: str
    content: str


async def history(store: Store, session_id: str, *, through: int, limit: int) -> list[Turn]:
    """The last `limit` conversation messages up to message id `through`, oldest first."""
    rows = await store.fetch(
        "SELECT role, content FROM messages WHERE session_id = $1 AND id <= $2"
        " AND role = ANY($3::text[]) ORDER BY id DESC LIMIT $4",
        uuid.UUID(session_id),
        through,
        list(MODEL_ROLES),
        limit,
    )
    return [Turn(MODEL_ROLES[r["role"]], r["content"]) for r in reversed(rows)]


async def recent(store: Store, session_id: str, limit: int) -> list[tuple[int, Turn]]:
    """The newest `limit` conversation messages of a session as (id, turn), any order."""
    rows = await store.fetch(
        "SELECT id, role, content FROM messages WHERE session_id = $1"
        " AND role = ANY($2::text[]) ORDER BY id DESC LIMIT $3",
        uuid.UUID(session_id),
        list(MODEL_ROLES),
        limit,
    )
    return [(r["id"], Turn(MODEL_ROLES[r["role"]], r["content"])) for r in rows]


async def reply_states(store: Store, session_ids: list[str]) -> dict[str, tuple[str, str]]:
    """(status, agent) of each session that still exists."""
    rows = await store.fetch(
        "SELECT id, status, agent FROM sessions WHERE id = ANY($1::uuid[])",
        [uuid.UUID(s) for s in session_ids],
    )
    return {str(r["id"]): (r["status"], r["agent"]) for r in rows}


async def message_by_id(store: Store, session_id: str, message_id: int) -> MessageRecord | None:
    row = await store.fetchrow(
        "SELECT * FROM messages WHERE session_id = $1 AND id = $2",
        uuid.UUID(session_id),
        message_id,
    )
    return message_from_row(row) if row else None


_STORE_REPLY = """
WITH stored AS (
    INSERT INTO messages (id, session_id, client_msg_id, role, user_id, content, metadata)
    SELECT $1, $2, $3, $4, $5, $6, $7::jsonb
    WHERE EXISTS (SELECT 1 FROM sessions WHERE id = $2)
    ON CONFLICT (session_id, user_id, client_msg_id) DO NOTHING
    RETURNING *
)
SELECT * FROM stored
UNION ALL
SELECT * FROM messages WHERE session_id = $2 AND user_id = $5 AND client_msg_id = $3
LIMIT 1
"""


async def store_reply(
    store: Store,
    *,
    session_id: str,
    message_id: int,
    client_msg_id: str,
    role: str,
    user_id: str,
    content: str,
    metadata: dict[str, Any],
) -> MessageRecord | None:
    """Store a reply with metadata once; the row as stored, None if the session is gone."""
    row = await store.fetchrow(
        _STORE_REPLY,
        message_id,
        uuid.UUID(session_id),
        client_msg_id,
        role,
        user_id,
        content,
        orjson.dumps(metadata).decode(),
    )
    return message_from_row(row) if row else None
