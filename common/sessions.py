"""Who may write to a session: a Redis cache in front of Postgres, never trusted over it.

The cache holds a session's status and participants for a short TTL. Whoever
changes either deletes the entry, so a stale read lasts at most one TTL and only
on a path that Postgres checks again (the worker locks the row it writes to).
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson
import redis.asyncio as aioredis

from common.keys import Keys
from common.store import OPEN_STATUSES, Store

CACHE_TTL = 30


@dataclass(frozen=True, slots=True)
class SessionAccess:
    status: str
    participants: frozenset[str]

    @property
    def is_open(self) -> bool:
        return self.status in OPEN_STATUSES


class SessionDirectory:
    """Looks up a session's status and participants, cache first."""

    def __init__(self, redis: aioredis.Redis, store: Store, keys: Keys) -> None:
        self._redis = redis
        self._store = store
        self._keys = keys

    async def lookup(self, session_id: str) -> SessionAccess | None:
        key = self._keys.session(session_id)
        cached = await self._redis.get(key)
        if cached is not None:
            raw = orjson.loads(cached)
            return SessionAccess(raw["s"], frozenset(raw["p"]))
        record = await self._store.get_session(session_id)
        if record is None:
            return None
        access = SessionAccess(record.status, frozenset(record.participants))
        payload = orjson.dumps({"s": access.status, "p": sorted(access.participants)})
        await self._redis.set(key, payload, ex=CACHE_TTL)
        return access

    async def invalidate(self, session_id: str) -> None:
        await self._redis.delete(self._keys.session(session_id))
