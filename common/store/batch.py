"""Many chat entries in one Postgres round trip: the worker's group commit.

A worker handles many conversations at once. Writing each message in its own
transaction costs about eight round trips and a WAL flush per message, and a shared
transaction of separate statements still cost five (BEGIN, lock, insert, activity,
COMMIT): on this 2-vCPU VM each round trip is tens of µs of CPU in system calls, on
both ends. `write_batch` takes whatever entries are ready together and writes them
with one call of `fanout_write_batch_v2` (common/store/migrations/m5_write_batch_v2.py),
in autocommit: the call is its own transaction, and one round trip however many entries.

Inside, in order, each statement with a fresh snapshot: lock the chats' sessions in
id order (PATCH transitions serialise with it); take two ids per chat; insert every
chat and reply once per (session, sender, client id); read the rows stored before
(a retry gets its first row); extend the TTL of the open sessions that got a message
(unless their expiry is already within TOUCH_SLACK of a fresh one) and start the pending
ones. It returns the facts; this module applies the rules of
common/store/lifecycle.py to them (who takes an assistant reply), so the SQL holds no copy
of them.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from common.store.lifecycle import OPEN, after_message, takes_assistant_reply
from common.store.postgres import MessageRecord, SessionRecord, message_from_row, session_from_row
from common.transport.entries import ChatEntry

_WRITE = """
SELECT * FROM fanout_write_batch_v2(
    $1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::jsonb[],
    $7::uuid[], $8::bigint[], $9::text[], $10::text[], $11::text[],
    $12::text[], $13::text[], $14::float8)
"""
# Seconds (and at most 1% of its TTL) by which a busy session's expiry may fall short of
# its last message + TTL: a session is rewritten at most about once per this, not once
# per batch (a new row version and index entries each time; issue 17).
TOUCH_SLACK = 5.0
# The lifecycle rule the function applies to a session that got a message.
_OPEN_FROM = sorted(OPEN)
_OPEN_TO = [after_message(status) for status in _OPEN_FROM]

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


async def write_batch(
    conn: asyncpg.Connection, chats: list[ChatEntry], replies: list[ReplyWrite]
) -> tuple[list[ChatWritten | None], list[MessageRecord]]:
    """Store chats and replies in one round trip; a chat whose session is gone gets None."""
    result = await conn.fetchrow(
        _WRITE,
        [uuid.UUID(c.session_id) for c in chats],
        [c.client_msg_id for c in chats],
        [c.user_id for c in chats],
        [c.device_id for c in chats],
        [c.content for c in chats],
        [_metadata(c.metadata) for c in chats],
        [uuid.UUID(r.session_id) for r in replies],
        [r.message_id for r in replies],
        [r.client_msg_id for r in replies],
        [r.user_id for r in replies],
        [r.content for r in replies],
        _OPEN_FROM,
        _OPEN_TO,
        TOUCH_SLACK,
    )
    assert result is not None
    members: dict[str, dict[str, str]] = {}  # session id -> user -> role, in joined order
    for p in result["session_members"]:
        members.setdefault(str(p["session_id"]), {})[p["user_id"]] = p["role"]
    locked = {
        str(r["id"]): session_from_row(r, list(members.get(str(r["id"]), {})))
        for r in result["sessions_locked"]
    }
    after = {
        str(r["id"]): session_from_row(r, list(members.get(str(r["id"]), {})))
        for r in result["sessions_touched"]
    }
    created = {_key(m) for m in map(message_from_row, result["inserted"])}
    stored = {_key(m): m for m in map(message_from_row, [*result["inserted"], *result["existing"]])}
    ids: list[int] = result["message_ids"]
    written: list[ChatWritten | None] = []
    for k, chat in enumerate(chats):
        before = locked.get(chat.session_id)
        if before is None:
            written.append(None)  # the session is gone: nothing stored
            continue
        session = after.get(chat.session_id, before)
        key = (chat.session_id, chat.user_id, chat.client_msg_id)
        role = members.get(chat.session_id, {}).get(chat.user_id, "user")
        fresh = key in created
        # A re-processed message may have its reply already: only a new one takes one.
        reply = fresh and takes_assistant_reply(session.status, session.agent, role)
        reply_id = ids[2 * k + 1] if reply else None
        written.append(ChatWritten(before, session, stored[key], fresh, role, reply_id))
    answered = [stored[(r.session_id, r.user_id, r.client_msg_id)] for r in replies]
    return written, answered


def _metadata(value: dict[str, Any] | None) -> str | None:
    return orjson.dumps(value).decode() if value is not None else None


def _key(message: MessageRecord) -> MessageKey:
    return (message.session_id, message.user_id, message.client_msg_id)
