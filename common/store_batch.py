"""Many chat entries in one Postgres transaction: the worker's group commit.

A worker handles many conversations at once. Writing each message in its own
transaction costs about eight round trips and a WAL flush per message, which made
Postgres and asyncpg the worker's busiest parts. `write_batch` takes whatever
entries are ready together and writes them in five round trips, however many:
BEGIN; lock the sessions (in id order, so two batches never deadlock) and read their
participants and fresh message ids; insert every message (chats and assistant
replies) with one `unnest` INSERT; extend the sessions' TTLs with one UPDATE; COMMIT.
(On this 2-vCPU VM a round trip costs tens of µs of CPU in the send() alone.)

Each step keeps the per-message rules of common/store.py: a message is stored once
per (session, sender, client id), and a retry gets the row stored the first time.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from common.entries import ChatEntry
from common.lifecycle import after_message, is_open, takes_assistant_reply
from common.store import MessageRecord, SessionRecord, message_from_row, session_from_row

# One round trip: the sessions locked in id order (two batches never deadlock), a row
# per participant in joined order, and 2 message ids per chat taken once (an
# uncorrelated subquery runs once per statement): one for the message, one for a
# reply it may get. Participants read in the same statement as the lock: one who
# joins while the lock is awaited is not sent this message, as if they had joined
# just after it.
_LOCK = """
SELECT s.*, p.user_id AS member, p.role AS member_role,
       (SELECT array_agg(nextval(pg_get_serial_sequence('messages', 'id')))
        FROM generate_series(1, $2)) AS ids
FROM sessions s LEFT JOIN participants p ON p.session_id = s.id
WHERE s.id = ANY($1::uuid[])
ORDER BY s.id, p.joined_at, p.user_id
FOR UPDATE OF s
"""
_INSERT = """
INSERT INTO messages (id, session_id, client_msg_id, role, user_id, device_id, content, metadata)
SELECT * FROM unnest($1::bigint[], $2::uuid[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $7::text[], $8::jsonb[])
ON CONFLICT (session_id, user_id, client_msg_id) DO NOTHING
RETURNING *
"""
_EXISTING = """
SELECT m.* FROM messages m
JOIN unnest($1::uuid[], $2::text[], $3::text[]) AS k(session_id, user_id, client_msg_id)
  USING (session_id, user_id, client_msg_id)
"""
_ACTIVITY = """
UPDATE sessions s SET last_activity_at = now(),
    expires_at = now() + s.ttl * interval '1 second',
    status = u.status,
    version = s.version + u.bump,
    updated_at = CASE WHEN u.bump = 1 THEN now() ELSE s.updated_at END
FROM unnest($1::uuid[], $2::text[], $3::int[]) AS u(id, status, bump)
WHERE s.id = u.id
RETURNING s.*
"""

MessageKey = tuple[str, str, str]  # session, sender, client message id


@dataclass(frozen=True, slots=True)
class ReplyWrite:
    """An assistant reply, stored under the id its deltas were streamed with."""

    session_id: str
    message_id: int
    client_msg_id: str
    user_id: str
    content: str


@dataclass(frozen=True, slots=True)
class ChatWritten:
    """What storing one chat entry did.

    `before` and `session` are the session as locked and after the message (they
    differ when the first message started a pending session). `reply_id` is set
    when the message takes an assistant reply (agent `ai`, running, sent by a user).
    """

    before: SessionRecord
    session: SessionRecord
    message: MessageRecord
    created: bool
    role: str
    reply_id: int | None


@dataclass(slots=True)
class _Row:
    message_id: int
    session_id: uuid.UUID
    client_msg_id: str
    role: str
    user_id: str
    device_id: str | None
    content: str
    metadata: str | None

    @property
    def key(self) -> MessageKey:
        return (str(self.session_id), self.user_id, self.client_msg_id)


Locked = dict[str, tuple[SessionRecord, dict[str, str]]]  # session id -> (row, roles)
# (row to insert, sender's role, reply id taken for it) per chat; None: session gone.
Plan = tuple[_Row, str, int | None] | None


async def write_batch(
    conn: asyncpg.Connection, chats: list[ChatEntry], replies: list[ReplyWrite]
) -> tuple[list[ChatWritten | None], list[MessageRecord]]:
    """Store chats and replies in one transaction; a chat whose session is gone gets None."""
    if not chats:
        # Replies alone are one INSERT: atomic by itself, no BEGIN/COMMIT round trips.
        stored, _ = await _insert(conn, [_reply_row(r) for r in replies])
        return [], [stored[(r.session_id, r.user_id, r.client_msg_id)] for r in replies]
    async with conn.transaction():
        locked, ids = await _lock(conn, chats)
        plans = _plan(chats, locked, ids)
        rows = [p[0] for p in plans if p is not None] + [_reply_row(r) for r in replies]
        stored, created = await _insert(conn, rows)
        after = await _record_activity(conn, locked, created)
    written: list[ChatWritten | None] = []
    for chat, plan in zip(chats, plans, strict=True):
        if plan is None:
            written.append(None)
            continue
        row, role, reply_id = plan
        before = locked[chat.session_id][0]
        session = after.get(chat.session_id, before)
        fresh = row.key in created
        if not fresh or not takes_assistant_reply(session.status, session.agent, role):
            reply_id = None  # a re-processed message may have its reply already
        written.append(ChatWritten(before, session, stored[row.key], fresh, role, reply_id))
    answered = [stored[(r.session_id, r.user_id, r.client_msg_id)] for r in replies]
    return written, answered


async def _lock(conn: asyncpg.Connection, chats: list[ChatEntry]) -> tuple[Locked, list[int]]:
    """The chats' sessions, locked for this transaction, with their participants' roles;
    and two fresh message ids per chat, ascending."""
    session_ids = {uuid.UUID(c.session_id) for c in chats}
    rows = await conn.fetch(_LOCK, list(session_ids), 2 * len(chats))
    by_session: dict[uuid.UUID, tuple[asyncpg.Record, dict[str, str]]] = {}
    for r in rows:
        _, roles = by_session.setdefault(r["id"], (r, {}))
        if r["member"] is not None:
            roles[r["member"]] = r["member_role"]
    # Dicts keep insertion order: participants come out in joined order, as elsewhere.
    locked = {
        str(key): (session_from_row(row, list(roles)), roles)
        for key, (row, roles) in by_session.items()
    }
    return locked, sorted(rows[0]["ids"]) if rows else []


def _plan(chats: list[ChatEntry], locked: Locked, ids: list[int]) -> list[Plan]:
    """A row per chat, with ids given in entry order (a conversation's order in history).

    A chat that may take an assistant reply gets the next id for it, so the reply sorts
    right after the message it answers, and its deltas can name it.
    """
    fresh = iter(ids)
    plans: list[Plan] = []
    for chat in chats:
        entry = locked.get(chat.session_id)
        if entry is None:
            plans.append(None)
            continue
        session, roles = entry
        status = after_message(session.status) if is_open(session.status) else session.status
        role = roles.get(chat.user_id, "user")
        meta = orjson.dumps(chat.metadata).decode() if chat.metadata is not None else None
        row = _Row(
            next(fresh),
            uuid.UUID(chat.session_id),
            chat.client_msg_id,
            role,
            chat.user_id,
            chat.device_id,
            chat.content,
            meta,
        )
        reply = takes_assistant_reply(status, session.agent, role)
        plans.append((row, role, next(fresh) if reply else None))
    return plans


def _reply_row(reply: ReplyWrite) -> _Row:
    return _Row(
        reply.message_id,
        uuid.UUID(reply.session_id),
        reply.client_msg_id,
        "assistant",
        reply.user_id,
        None,
        reply.content,
        None,
    )


async def _insert(
    conn: asyncpg.Connection, rows: list[_Row]
) -> tuple[dict[MessageKey, MessageRecord], set[MessageKey]]:
    """Insert the rows once each; every row as stored, and the keys inserted just now."""
    if not rows:
        return {}, set()
    columns = [list(c) for c in zip(*(_values(r) for r in rows), strict=True)]
    inserted = [message_from_row(r) for r in await conn.fetch(_INSERT, *columns)]
    stored = {_key(m): m for m in inserted}
    created = set(stored)
    missing = [r for r in rows if r.key not in stored]
    if missing:
        # Stored before (a re-processed entry, a retried reply): the first row stands.
        found = await conn.fetch(
            _EXISTING,
            [r.session_id for r in missing],
            [r.user_id for r in missing],
            [r.client_msg_id for r in missing],
        )
        stored.update((_key(m), m) for m in map(message_from_row, found))
    return stored, created


def _values(row: _Row) -> tuple[Any, ...]:
    return (
        row.message_id,
        row.session_id,
        row.client_msg_id,
        row.role,
        row.user_id,
        row.device_id,
        row.content,
        row.metadata,
    )


def _key(message: MessageRecord) -> MessageKey:
    return (message.session_id, message.user_id, message.client_msg_id)


async def _record_activity(
    conn: asyncpg.Connection, locked: Locked, created: set[MessageKey]
) -> dict[str, SessionRecord]:
    """Extend the TTL of each open session that got a message; a pending one starts running."""
    touched = {key[0] for key in created} & {s for s, (r, _) in locked.items() if r.is_open}
    if not touched:
        return {}
    ids, statuses, bumps = [], [], []
    for session_id in touched:
        session = locked[session_id][0]
        status = after_message(session.status)
        ids.append(uuid.UUID(session_id))
        statuses.append(status)
        bumps.append(1 if status != session.status else 0)
    rows = await conn.fetch(_ACTIVITY, ids, statuses, bumps)
    return {
        str(r["id"]): session_from_row(r, list(locked[str(r["id"])][0].participants)) for r in rows
    }
