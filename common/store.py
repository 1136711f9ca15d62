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

OPEN_STATUSES = ("pending", "running", "paused")


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
        return self.status in OPEN_STATUSES

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


def _session(row: asyncpg.Record, participants: list[str]) -> SessionRecord:
    return SessionRecord(
        id=str(row["id"]),
        owner=row["owner"],
        participants=tuple(participants),
        status=row["status"],
        agent=row["agent"],
        metadata=orjson.loads(row["metadata"]),
        ttl=row["ttl"],
        version=row["version"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        last_activity_at=row["last_activity_at"],
        expires_at=row["expires_at"],
    )


def _message(row: asyncpg.Record) -> MessageRecord:
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


_PARTICIPANTS = "SELECT user_id FROM participants WHERE session_id = $1 ORDER BY joined_at, user_id"


class Store:
    """Typed queries over an asyncpg pool."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @classmethod
    @asynccontextmanager
    async def open(cls, url: str, *, min_size: int = 1, max_size: int = 10) -> AsyncIterator[Store]:
        """A pool for the process's lifetime; closed on exit."""
        pool = await asyncpg.create_pool(
            url, min_size=min_size, max_size=max_size, timeout=5, command_timeout=30
        )
        try:
            yield cls(pool)
        finally:
            await pool.close()

    async def ping(self) -> None:
        async with self.pool.acquire(timeout=2) as conn:
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
        async with self.pool.acquire() as conn, conn.transaction():
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
        return _session(row, members)

    async def get_session(self, session_id: str) -> SessionRecord | None:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow("SELECT * FROM sessions WHERE id = $1", uuid.UUID(session_id))
            if row is None:
                return None
            members = [r["user_id"] for r in await conn.fetch(_PARTICIPANTS, row["id"])]
        return _session(row, members)

    @asynccontextmanager
    async def conversation(self, session_id: str) -> AsyncIterator[Conversation]:
        """One transaction over a session, its row locked: the worker's unit of work."""
        async with self.pool.acquire() as conn, conn.transaction():
            yield Conversation(conn, uuid.UUID(session_id))  # type: ignore[arg-type]

    async def next_message_id(self) -> int:
        value: int = await self.pool.fetchval(
            "SELECT nextval(pg_get_serial_sequence('messages', 'id'))"
        )
        return value

    async def find_message(
        self, session_id: str, user_id: str, client_msg_id: str
    ) -> MessageRecord | None:
        row = await self.pool.fetchrow(
            "SELECT * FROM messages WHERE session_id = $1 AND user_id = $2 AND client_msg_id = $3",
            uuid.UUID(session_id),
            user_id,
            client_msg_id,
        )
        return _message(row) if row else None


class Conversation:
    """Queries inside the worker's per-entry transaction."""

    def __init__(self, conn: asyncpg.Connection, session_id: uuid.UUID) -> None:
        self._conn = conn
        self._id = session_id

    async def lock(self) -> SessionRecord | None:
        row = await self._conn.fetchrow("SELECT * FROM sessions WHERE id = $1 FOR UPDATE", self._id)
        if row is None:
            return None
        members = [r["user_id"] for r in await self._conn.fetch(_PARTICIPANTS, self._id)]
        return _session(row, members)

    async def participant_role(self, user_id: str) -> str | None:
        role: str | None = await self._conn.fetchval(
            "SELECT role FROM participants WHERE session_id = $1 AND user_id = $2",
            self._id,
            user_id,
        )
        return role

    async def insert_message(
        self,
        *,
        client_msg_id: str,
        role: str,
        user_id: str,
        device_id: str | None,
        content: str,
        metadata: dict[str, Any] | None,
        message_id: int | None = None,
    ) -> tuple[MessageRecord, bool]:
        """Insert once per (session, user, client id); (row, created): a retry gets the first."""
        meta = orjson.dumps(metadata).decode() if metadata is not None else None
        row = await self._conn.fetchrow(
            "INSERT INTO messages"
            " (id, session_id, client_msg_id, role, user_id, device_id, content, metadata)"
            " VALUES (COALESCE($1, nextval(pg_get_serial_sequence('messages', 'id'))),"
            " $2, $3, $4, $5, $6, $7, $8::jsonb)"
            " ON CONFLICT (session_id, user_id, client_msg_id) DO NOTHING RETURNING *",
            message_id,
            self._id,
            client_msg_id,
            role,
            user_id,
            device_id,
            content,
            meta,
        )
        if row is not None:
            return _message(row), True
        existing = await self._conn.fetchrow(
            "SELECT * FROM messages WHERE session_id = $1 AND user_id = $2 AND client_msg_id = $3",
            self._id,
            user_id,
            client_msg_id,
        )
        assert existing is not None
        return _message(existing), False

    async def record_activity(self, session: SessionRecord) -> SessionRecord:
        """Extend the TTL; a pending session starts running. The row after the update."""
        start = ", status = 'running', version = version + 1, updated_at = now()"
        row = await self._conn.fetchrow(
            "UPDATE sessions SET last_activity_at = now(),"
            " expires_at = now() + ttl * interval '1 second'"
            + (start if session.status == "pending" else "")
            + " WHERE id = $1 RETURNING *",
            self._id,
        )
        assert row is not None
        return _session(row, list(session.participants))
