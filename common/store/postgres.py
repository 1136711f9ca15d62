"""Postgres access: sessions, participants and messages (the source of truth, SPEC §2)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from common.store.lifecycle import is_open

# Seconds to wait for a pooled connection: when Postgres is down, callers get a
# TimeoutError (UNAVAILABLE, retry) instead of waiting on the pool's reconnects.
ACQUIRE_TIMEOUT = 3.0


def iso_time(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class SessionRecord:
    id: str
    owner: str
    participants: tuple[str, ...]
    status: str
    agent: str
    metadata: dict[str, Any]
    ttl: int
    version: int
    created_at: datetime
    updated_at: datetime
    last_activity_at: datetime
    expires_at: datetime

    @property
    def is_open(self) -> bool:
        return is_open(self.status)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "owner": self.owner,
            "participants": list(self.participants),
            "status": self.status,
            "agent": self.agent,
            "metadata": self.metadata,
            "ttl": self.ttl,
            "created_at": iso_time(self.created_at),
            "updated_at": iso_time(self.updated_at),
            "last_activity_at": iso_time(self.last_activity_at),
            "expires_at": iso_time(self.expires_at),
        }


@dataclass(frozen=True, slots=True)
class MessageRecord:
    id: int
    session_id: str
    client_msg_id: str
    role: str
    user_id: str
    device_id: str | None
    content: str
    metadata: dict[str, Any] | None
    created_at: datetime

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "client_msg_id": self.client_msg_id,
            "role": self.role,
            "user_id": self.user_id,
            "device_id": self.device_id,
            "content": self.content,
            "created_at": iso_time(self.created_at),
        }
        if self.metadata:
            out["metadata"] = self.metadata
        return out


_SESSION_COLUMNS = (
    "owner",
    "status",
    "agent",
    "ttl",
    "version",
    "created_at",
    "updated_at",
    "last_activity_at",
    "expires_at",
)


def session_from_row(row: asyncpg.Record, participants: list[str]) -> SessionRecord:
    """A session row (SELECT *) and its participants as a record."""
    return SessionRecord(
        id=str(row["id"]),
        participants=tuple(participants),
        metadata=orjson.loads(row["metadata"]),
        **{name: row[name] for name in _SESSION_COLUMNS},
    )


def message_from_row(row: asyncpg.Record) -> MessageRecord:
    """A messages row as a record."""
    return MessageRecord(
        id=row["id"],
        session_id=str(row["session_id"]),
        client_msg_id=row["client_msg_id"],
        role=row["role"],
        user_id=row["user_id"],
        device_id=row["device_id"],
        content=row["content"],
        metadata=orjson.loads(row["metadata"]) if row["metadata"] is not None else None,
        created_at=row["created_at"],
    )


PARTICIPANTS = "SELECT user_id FROM participants WHERE session_id = $1 ORDER BY joined_at, user_id"
_PARTICIPANTS_OF_MANY = (
    "SELECT session_id, user_id FROM participants WHERE session_id = ANY($1::uuid[])"
    " ORDER BY joined_at, user_id"
)
SessionCursor = tuple[datetime, uuid.UUID]


async def _keep_session_state(conn: asyncpg.Connection) -> None:
    """Pool reset: nothing to undo. fanout never LISTENs, SETs, holds cursors or advisory
    locks on pooled connections (asyncpg still rolls back an open transaction itself),
    and the default reset query cost a round trip on every release."""


class Store:
    """Typed queries over an asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @classmethod
    @asynccontextmanager
    async def open(
        cls, url: str, *, min_size: int = 1, max_size: int = 10, webhooks: bool = False
    ) -> AsyncIterator[Store]:
        """A pool for the process's lifetime; closed on exit.

        `webhooks`: this process's writes record webhook events (the outbox triggers of
        migration 4 read `fanout.webhooks`, set once per connection, so nothing is reset).
        """
        pool = await asyncpg.create_pool(
            url,
            min_size=min_size,
            max_size=max_size,
            timeout=5,
            command_timeout=30,
            reset=_keep_session_state,
            server_settings={"fanout.webhooks": "on" if webhooks else "off"},
        )
        try:
            yield cls(pool)
        finally:
            await pool.close()

    def acquire(self) -> Any:
        """A pooled connection; TimeoutError (UNAVAILABLE) when none comes in time."""
        return self.pool.acquire(timeout=ACQUIRE_TIMEOUT)

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        async with self.acquire() as conn:
            rows: list[asyncpg.Record] = await conn.fetch(query, *args)
            return rows

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        async with self.acquire() as conn:
            row: asyncpg.Record | None = await conn.fetchrow(query, *args)
            return row

    async def fetchval(self, query: str, *args: Any) -> Any:
        async with self.acquire() as conn:
            return await conn.fetchval(query, *args)

    async def execute(self, query: str, *args: Any) -> str:
        async with self.acquire() as conn:
            result: str = await conn.execute(query, *args)
            return result

    async def ping(self) -> None:
        async with self.acquire() as conn:
            await conn.fetchval("SELECT 1")

    async def create_session(
        self,
        *,
        owner: str,
        participants: list[str],
        agent: str,
        ttl: int,
        metadata: dict[str, Any],
    ) -> SessionRecord:
        members = list(dict.fromkeys([owner, *participants]))
        session_id = uuid.uuid4()
        async with self.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "INSERT INTO sessions (id, owner, status, agent, metadata, ttl, expires_at)"
                " VALUES ($1, $2, 'pending', $3, $4::jsonb, $5,"
                " now() + $5::int * interval '1 second')"
                " RETURNING *",
                session_id,
                owner,
                agent,
                orjson.dumps(metadata).decode(),
                ttl,
            )
            await conn.executemany(
                "INSERT INTO participants (session_id, user_id) VALUES ($1, $2)",
                [(session_id, m) for m in members],
            )
        assert row is not None
        return session_from_row(row, members)

    async def get_session(self, session_id: str) -> SessionRecord | None:
        async with self.acquire() as conn:
            row = await conn.fetchrow("SELECT * FROM sessions WHERE id = $1", uuid.UUID(session_id))
            if row is None:
                return None
            members = [r["user_id"] for r in await conn.fetch(PARTICIPANTS, row["id"])]
        return session_from_row(row, members)

    async def list_sessions(
        self, *, user_id: str | None, status: str | None, after: SessionCursor | None, limit: int
    ) -> list[SessionRecord]:
        """Newest first: a user's sessions, or every session when `user_id` is None (admin)."""
        where: list[str] = []
        args: list[Any] = []
        if user_id is not None:
            args.append(user_id)
            where.append(
                f"id IN (SELECT session_id FROM participants WHERE user_id = ${len(args)})"
            )
        if status is not None:
            args.append(status)
            where.append(f"status = ${len(args)}")
        if after is not None:
            args.extend(after)
            where.append(f"(created_at, id) < (${len(args) - 1}, ${len(args)})")
        args.append(limit)
        sql = (
            "SELECT * FROM sessions"
            + (" WHERE " + " AND ".join(where) if where else "")
            + f" ORDER BY created_at DESC, id DESC LIMIT ${len(args)}"
        )
        async with self.acquire() as conn:
            rows = await conn.fetch(sql, *args)
            members: dict[uuid.UUID, list[str]] = {r["id"]: [] for r in rows}
            for r in await conn.fetch(_PARTICIPANTS_OF_MANY, list(members)):
                members[r["session_id"]].append(r["user_id"])
        return [session_from_row(r, members[r["id"]]) for r in rows]

    async def delete_session(self, session_id: str) -> bool:
        """Delete a session with its participants and messages; False if it was not there."""
        result: str = await self.execute(
            "DELETE FROM sessions WHERE id = $1", uuid.UUID(session_id)
        )
        return result != "DELETE 0"

    async def messages(
        self, session_id: str, *, before: int | None, limit: int
    ) -> list[MessageRecord]:
        """A page of history, newest first, with ids below `before` (index messages_history)."""
        # Two statements rather than `$2 IS NULL OR id < $2`: a generic plan of the
        # latter cannot use the bound as an index condition.
        if before is None:
            rows = await self.fetch(
                "SELECT * FROM messages WHERE session_id = $1 ORDER BY id DESC LIMIT $2",
                uuid.UUID(session_id),
                limit,
            )
        else:
            rows = await self.fetch(
                "SELECT * FROM messages WHERE session_id = $1 AND id < $2"
                " ORDER BY id DESC LIMIT $3",
                uuid.UUID(session_id),
                before,
                limit,
            )
        return [message_from_row(r) for r in rows]

    async def next_message_id(self) -> int:
        value: int = await self.fetchval("SELECT nextval(pg_get_serial_sequence('messages', 'id'))")
        return value

    async def find_message(
        self, session_id: str, user_id: str, client_msg_id: str
    ) -> MessageRecord | None:
        row = await self.fetchrow(
            "SELECT * FROM messages WHERE session_id = $1 AND user_id = $2 AND client_msg_id = $3",
            uuid.UUID(session_id),
            user_id,
            client_msg_id,
        )
        return message_from_row(row) if row else None
