"""Owed replies: a durable note, per partition, of every reply a worker still has to make.

A chat entry is acknowledged once its message is stored and delivered, before its
reply is generated (a slow model must not hold the partition's stream). What keeps
the reply from being lost when the worker dies meanwhile is this note: a Redis hash
per partition, field = the answered message's id, written before the acknowledgement
and deleted once the reply is stored and delivered. Whoever owns the partition next
reads the hash when it takes the partition over and makes the replies it finds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis

from common.transport.connection import RespConnection
from common.transport.keys import Keys


@dataclass(frozen=True, slots=True)
class OwedReply:
    """A reply owed to message `message_id`, streamed and stored under `reply_id`."""

    session_id: str
    message_id: int
    reply_id: int

    def encode(self) -> bytes:
        return orjson.dumps([self.session_id, self.message_id, self.reply_id])

    @classmethod
    def decode(cls, raw: bytes) -> OwedReply:
        session_id, message_id, reply_id = orjson.loads(raw)
        return cls(str(session_id), int(message_id), int(reply_id))


class OwedReplies:
    """The per-partition hashes, on the shared pipelined connection where there is one."""

    def __init__(
        self, redis: aioredis.Redis, keys: Keys, commands: RespConnection | None = None
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._commands = commands

    async def _call(self, *args: str | bytes | int) -> Any:
        if self._commands is not None:
            return await self._commands.call(*args)
        return await self._redis.execute_command(*args)  # type: ignore[no-untyped-call]

    async def note(self, partition: int, owed: OwedReply) -> OwedReply:
        """Record a reply as owed; if one is owed to that message already, that one."""
        key = self._keys.owed_replies(partition)
        field = str(owed.message_id)
        if await self._call("HSETNX", key, field, owed.encode()):
            return owed
        earlier = await self._call("HGET", key, field)
        return OwedReply.decode(earlier) if earlier else owed

    def record_soon(self, partition: int, owed: OwedReply) -> Awaitable[Any]:
        """Record a new owed reply (none can exist yet); await the outcome later."""
        args = ("HSET", self._keys.owed_replies(partition), str(owed.message_id), owed.encode())
        if self._commands is not None:
            return self._commands.submit(*args)
        return asyncio.ensure_future(self._call(*args))

    async def settle(self, partition: int, message_id: int) -> None:
        """The reply is stored and delivered: nothing is owed any more."""
        await self._call("HDEL", self._keys.owed_replies(partition), str(message_id))

    async def all(self, partition: int) -> list[OwedReply]:
        """Every reply owed in a partition, oldest message first."""
        raw: list[bytes | str] = await self._redis.hvals(self._keys.owed_replies(partition))
        owed = [OwedReply.decode(r.encode() if isinstance(r, str) else r) for r in raw]
        return sorted(owed, key=lambda o: o.message_id)
