"""Sessions after creation: who may write to one, and every change of one (SPEC §5).

Reads. `SessionDirectory` caches a session's status and participants in Redis,
stamped with the row's version. A write replaces only an older version, so a
reader that raced a change can never put the old state back. The cache is never
trusted over Postgres: the worker locks the row it writes to.

Changes. `SessionChanges` applies each change in one statement (the rules live in
common/store/lifecycle.py), commits, then announces it: the cache gets the new version
and every participant's devices a `session` frame (with seq), keyed by the version
so it is sent once. A change whose announcement was lost (a crash, Redis down)
still has `announced_version < version`; the sweeper announces it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis

from common.errors import SERVICE_DOWN
from common.protocol import encode
from common.store.lifecycle import OPEN, STATUSES, Refused, allowed_from, is_open
from common.store.postgres import PARTICIPANTS, SessionRecord, Store, iso_time, session_from_row
from common.transport.bus import Bus
from common.transport.connection import RespConnection
from common.transport.keys import Keys
from common.transport.tombstones import LogEraser

log = logging.getLogger("fanout.sessions")

CACHE_TTL = 30
ANNOUNCE_TIMEOUT = 5.0
# Versions are Postgres integers; a deleted (or never created) session outranks them all.
_GONE = 2**31

# KEYS: cache key; ARGV: version, payload, ttl s. Writes only over an older version.
_REMEMBER = """
local cached = redis.call('GET', KEYS[1])
if cached then
  local ok, old = pcall(cjson.decode, cached)
  if ok and type(old) == 'table' and (tonumber(old['v']) or 0) >= tonumber(ARGV[1]) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
return 1
"""

# The literal list matches the partial index sessions_open_expiry.
_EXPIRE = """
WITH due AS (
    SELECT id FROM sessions
    WHERE status IN ('pending','running','paused') AND expires_at <= now()
    ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED)
UPDATE sessions s SET status = 'expired', version = s.version + 1, updated_at = now()
FROM due WHERE s.id = due.id AND s.status = ANY($2::text[])
RETURNING s.id
"""

# One statement: of racing changes the row lock lets one through, and the others
# re-check `status = ANY($7)` against the row it left, so they match nothing.
_UPDATE = """
UPDATE sessions SET
    status = COALESCE($2::text, status),
    agent = COALESCE($3::text, agent),
    ttl = COALESCE($4::int, ttl),
    metadata = COALESCE($5::jsonb, metadata),
    last_activity_at = CASE WHEN COALESCE($2::text, status) = ANY($6::text[])
        THEN now() ELSE last_activity_at END,
    expires_at = CASE WHEN COALESCE($2::text, status) = ANY($6::text[])
        THEN now() + COALESCE($4::int, ttl) * interval '1 second' ELSE expires_at END,
    version = version + 1,
    updated_at = now()
WHERE id = $1 AND status = ANY($7::text[])
RETURNING *
"""


class TooManyParticipants(Exception):
    """An add would take a session past its participant cap (SPEC §6: 409)."""

    def __init__(self, cap: int) -> None:
        super().__init__(f"a session has at most {cap} participants")
        self.message = str(self)


class NotParticipant(Exception):
    """The user to remove is not a participant of the session."""


class OwnerStays(Exception):
    """The owner cannot leave or be removed (SPEC §6: delete the session instead)."""


@dataclass(frozen=True, slots=True)
class SessionAccess:
    """What a node checks a chat against: the session's status and participants."""

    status: str
    participants: frozenset[str]

    @property
    def is_open(self) -> bool:
        return is_open(self.status)


def session_body(session: SessionRecord) -> bytes:
    """The `session` frame of a session's current state, without its leading brace."""
    return encode(
        {
            "type": "session",
            "session_id": session.id,
            "status": session.status,
            "agent": session.agent,
            "expires_at": iso_time(session.expires_at),
        }
    )[1:]


class SessionDirectory:
    """Looks up a session's status and participants, cache first."""

    def __init__(
        self,
        redis: aioredis.Redis,
        store: Store,
        keys: Keys,
        commands: RespConnection | None = None,
    ) -> None:
        self._redis = redis
        self._store = store
        self._keys = keys
        self._remember = redis.register_script(_REMEMBER)
        # Every chat frame looks its session up: on a node, through the shared pipelined
        # connection, not a pooled one per lookup (a burst of those exhausted redis-py's
        # pool under load).
        self._pipeliner = commands

    async def lookup(self, session_id: str) -> SessionAccess | None:
        key = self._keys.session(session_id)
        if self._pipeliner is not None:
            cached = await self._pipeliner.call("GET", key)
        else:
            cached = await self._redis.get(key)
        if cached is not None:
            raw = orjson.loads(cached)
            if raw.get("gone"):
                return None
            return SessionAccess(raw["s"], frozenset(raw["p"]))
        record = await self._store.get_session(session_id)
        if record is None:
            # Ids are random and made at creation, so "no such session" never goes stale.
            await self.forget(session_id)
            return None
        await self.remember(record)
        return SessionAccess(record.status, frozenset(record.participants))

    async def remember(self, record: SessionRecord) -> None:
        """Cache a session's state unless a newer version is cached already."""
        payload = {"v": record.version, "s": record.status, "p": sorted(record.participants)}
        await self._put(record.id, record.version, payload)

    async def forget(self, session_id: str) -> None:
        """Cache that a session does not exist (deleted): it outranks every version."""
        await self._put(session_id, _GONE, {"v": _GONE, "gone": True})

    async def invalidate(self, session_id: str) -> None:
        """Drop the cached entry; prefer `remember`, which a racing reader cannot undo."""
        await self._redis.delete(self._keys.session(session_id))

    async def _put(self, session_id: str, version: int, payload: dict[str, Any]) -> None:
        await self._remember(
            keys=[self._keys.session(session_id)],
            args=[version, orjson.dumps(payload), CACHE_TTL],
        )


class SessionChanges:
    """Changes sessions atomically in Postgres and announces each change once."""

    def __init__(
        self,
        store: Store,
        bus: Bus,
        directory: SessionDirectory,
        eraser: LogEraser | None = None,
    ) -> None:
        self._store = store
        self._bus = bus
        self._directory = directory
        # Deletes erase the session's messages from the participants' delivery logs
        # (SPEC §6); a process that never deletes (the worker) has none.
        self._eraser = eraser

    async def update(
        self,
        session_id: str,
        *,
        status: str | None = None,
        agent: str | None = None,
        ttl: int | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> SessionRecord | None:
        """Apply a PATCH; None if there is no such session, `Refused` if it is illegal.

        A status must be reachable from the current one; agent and TTL change only
        while the session is open; metadata may change at any time. On an open
        session every change counts as activity and restarts the TTL.
        """
        if status is not None:
            allowed = allowed_from(status)
        elif agent is not None or ttl is not None:
            allowed = OPEN
        else:
            allowed = STATUSES
        key = uuid.UUID(session_id)
        meta = orjson.dumps(metadata).decode() if metadata is not None else None
        async with self._store.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                _UPDATE, key, status, agent, ttl, meta, list(OPEN), list(allowed)
            )
            if row is None:
                current: str | None = await conn.fetchval(
                    "SELECT status FROM sessions WHERE id = $1", key
                )
                if current is None:
                    return None
                if status is not None:
                    raise Refused(current, f"session is {current}; it cannot become {status}")
                raise Refused(current, f"session is {current}; only its metadata may change")
            members = [r["user_id"] for r in await conn.fetch(PARTICIPANTS, key)]
        record = session_from_row(row, members)
        await self.announce_soon(record.id)
        return record

    async def add_participant(
        self, session_id: str, user_id: str, *, role: str, cap: int
    ) -> SessionRecord | None:
        """Add (or make an agent of) a participant of an open session; None if none.

        `TooManyParticipants` when a new participant would make more than `cap`: the
        count is read under the session's row lock, so racing adds cannot overshoot.
        """
        key = uuid.UUID(session_id)
        async with self._store.acquire() as conn, conn.transaction():
            current: str | None = await conn.fetchval(
                "SELECT status FROM sessions WHERE id = $1 FOR UPDATE", key
            )
            if current is None:
                return None
            if not is_open(current):
                raise Refused(current, f"session is {current}; no one can join it")
            members = [r["user_id"] for r in await conn.fetch(PARTICIPANTS, key)]
            if user_id not in members and len(members) >= cap:
                raise TooManyParticipants(cap)
            # A user who joins as an agent is upgraded; an agent is never downgraded.
            changed = await conn.fetchval(
                "INSERT INTO participants (session_id, user_id, role) VALUES ($1, $2, $3)"
                " ON CONFLICT (session_id, user_id) DO UPDATE SET role = EXCLUDED.role"
                " WHERE participants.role <> EXCLUDED.role AND EXCLUDED.role = 'agent'"
                " RETURNING true",
                key,
                user_id,
                role,
            )
            if changed:
                row = await conn.fetchrow(
                    "UPDATE sessions SET version = version + 1, updated_at = now()"
                    " WHERE id = $1 RETURNING *",
                    key,
                )
            else:
                row = await conn.fetchrow("SELECT * FROM sessions WHERE id = $1", key)
            assert row is not None
            members = [r["user_id"] for r in await conn.fetch(PARTICIPANTS, key)]
        record = session_from_row(row, members)
        if changed:
            await self.announce_soon(record.id)
        return record

    async def remove_participant(self, session_id: str, user_id: str) -> SessionRecord | None:
        """Remove a participant (any status); None if no session, `NotParticipant` if absent.

        The caller has checked who may remove whom; the owner is never removed here.
        """
        key = uuid.UUID(session_id)
        async with self._store.acquire() as conn, conn.transaction():
            owner: str | None = await conn.fetchval(
                "SELECT owner FROM sessions WHERE id = $1 FOR UPDATE", key
            )
            if owner is None:
                return None
            if owner == user_id:
                raise OwnerStays("the owner cannot leave; delete the session instead")
            removed = await conn.fetchval(
                "DELETE FROM participants WHERE session_id = $1 AND user_id = $2 RETURNING true",
                key,
                user_id,
            )
            if not removed:
                raise NotParticipant(user_id)
            row = await conn.fetchrow(
                "UPDATE sessions SET version = version + 1, updated_at = now()"
                " WHERE id = $1 RETURNING *",
                key,
            )
            assert row is not None
            members = [r["user_id"] for r in await conn.fetch(PARTICIPANTS, key)]
        record = session_from_row(row, members)
        # The cache then holds the new participants: the removed user's chats are refused.
        await self.announce_soon(record.id)
        return record

    async def delete(self, session_id: str) -> bool:
        """Delete a session, its participants and its messages, and erase its messages
        from the participants' delivery logs; False if it was not there."""
        # The participants as the delete found them: an add serialises with it on the
        # session's row lock, and the subquery reads the rows before the cascade.
        members: list[str] | None = await self._store.fetchval(
            "DELETE FROM sessions WHERE id = $1"
            " RETURNING ARRAY(SELECT user_id FROM participants WHERE session_id = $1)",
            uuid.UUID(session_id),
        )
        if members is None:
            return False
        await self._directory.forget(session_id)
        if self._eraser is not None:
            try:
                await self._eraser.erase(members, session_id)
            except SERVICE_DOWN as exc:  # deleted all the same; the second pass may do it
                log.warning("session %s: log erase failed (%r)", session_id, exc)
            self._eraser.erase_again_later(members, session_id)
        return True

    async def expire_overdue(self, limit: int) -> list[str]:
        """Expire up to `limit` open sessions past their TTL and announce it; their ids."""
        rows = await self._store.fetch(_EXPIRE, limit, list(allowed_from("expired")))
        expired = [str(r["id"]) for r in rows]
        for session_id in expired:
            await self.announce_soon(session_id)
        return expired

    async def announce_overdue(self, *, older_than: float, limit: int) -> int:
        """Announce changes left unannounced for `older_than` seconds; how many."""
        rows = await self._store.fetch(
            "SELECT id FROM sessions WHERE announced_version < version"
            " AND updated_at < now() - $1::float8 * interval '1 second'"
            " ORDER BY updated_at LIMIT $2",
            older_than,
            limit,
        )
        announced = 0
        for row in rows:
            announced += await self.announce(str(row["id"]))
        return announced

    async def announce(self, session_id: str) -> bool:
        """Cache and deliver the newest change if it is unannounced; False if none was."""
        async with self._unannounced(session_id) as record:
            if record is None:
                return False
            # Bounded: a hung Redis must not hold the row lock (and the session's chats).
            async with asyncio.timeout(ANNOUNCE_TIMEOUT):
                await self._directory.remember(record)
                await self._bus.deliver(
                    record.participants,
                    session_body(record),
                    delivery_key=f"s{record.id}.{record.version}",
                )
        return True

    async def announce_soon(self, session_id: str) -> None:
        """Announce now; if a backing service is down, the sweeper does it later."""
        try:
            await self.announce(session_id)
        except SERVICE_DOWN as exc:
            log.warning("session %s: announcement deferred to the sweeper (%r)", session_id, exc)

    @asynccontextmanager
    async def _unannounced(self, session_id: str) -> AsyncIterator[SessionRecord | None]:
        # The row stays locked while its frame goes out: announcements of one session
        # leave in version order, and a newer change waits for an older one's frame.
        key = uuid.UUID(session_id)
        async with self._store.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT * FROM sessions WHERE id = $1 AND announced_version < version FOR UPDATE",
                key,
            )
            if row is None:
                yield None
                return
            members = [r["user_id"] for r in await conn.fetch(PARTICIPANTS, key)]
            record = session_from_row(row, members)
            yield record
            await conn.execute(
                "UPDATE sessions SET announced_version = $2 WHERE id = $1", key, record.version
            )
