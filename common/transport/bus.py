"""The Redis side of fanout: logged and ephemeral deliveries to users, and conversation queues.

A logged delivery (SPEC §2) runs one script for all its users (up to USERS_PER_CALL
a call; per slot on Redis Cluster) that, for each user and atomically, assigns the
next seq, appends the frame to the user's bounded delivery log and publishes it.
Publication order is therefore seq order. A delivery key makes the script
idempotent: the delivery's marker hash holds each user's seq, so a message
re-processed after a worker crash keeps its first seq.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import NoScriptError

from common.config import Settings
from common.protocol import skip_device
from common.transport.connection import RespConnection
from common.transport.keys import Keys, slot_tags

# The seq counter outlives the log so that seqs never restart while a client may
# still hold an old one; 30 days of silence resets a user to seq 1.
SEQ_TTL = 30 * 86400

# Users per script call: a call costs Redis ~8 µs of its own however many users it
# serves (scripts/bench_redis.py), so a message's users share one; the bound keeps
# one call from holding Redis for long.
USERS_PER_CALL = 100
# Below this log length trimming is exact; from it on XADD trims whole radix-tree nodes
# ("MAXLEN ~"), which is cheaper: a log then holds at least its length, never fewer.
APPROXIMATE_TRIM_FROM = 1000

# KEYS: the delivery's marker hash (user -> seq), then each user's seq, log, channel
# ARGV: frame body without its leading "{", trim ("~" or "="), log maxlen, log ttl,
#       seq ttl, keyed 0/1, publish command (PUBLISH or SPUBLISH), then the user ids
_DELIVER = """
local body, trim, maxlen, log_ttl, seq_ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local keyed, publish, first_user = ARGV[6] == '1', ARGV[7], 8
local known = {}
if keyed then known = redis.call('HMGET', KEYS[1], unpack(ARGV, first_user)) end
-- Published behind a stamp of Redis' clock (common/protocol.py STAMP_MARK) so that a
-- node can measure publish -> socket; the log keeps the bare frame.
local now = redis.call('TIME')
local stamp = '@' .. now[1] .. string.format('%06d', tonumber(now[2])) .. '\\n'
local seqs, marks = {}, {}
for i = 1, #ARGV - first_user + 1 do
  local seq = known[i] and tonumber(known[i])
  if not seq then
    local k = 3 * i - 1
    seq = redis.call('INCR', KEYS[k])
    redis.call('EXPIRE', KEYS[k], seq_ttl)
    if seq == 1 then redis.call('DEL', KEYS[k + 1]) end
    local frame = '{"seq":' .. seq .. ',' .. body
    redis.call('XADD', KEYS[k + 1], 'MAXLEN', trim, maxlen, seq .. '-0', 'f', frame)
    redis.call('EXPIRE', KEYS[k + 1], log_ttl)
    redis.call(publish, KEYS[k + 2], stamp .. frame)
    marks[#marks + 1] = ARGV[first_user + i - 1]
    marks[#marks + 1] = seq
  end
  seqs[i] = seq
end
if #marks > 0 and keyed then
  redis.call('HSET', KEYS[1], unpack(marks))
  redis.call('EXPIRE', KEYS[1], log_ttl)
end
return seqs
"""


async def connect_redis(settings: Settings) -> aioredis.Redis:
    """A pooled client for commands (not pub/sub: see common/transport/pubsub.py).

    In cluster mode this is a `RedisCluster`; it is typed as `Redis` because every
    command fanout sends through it has one key (or keys of one slot), which the
    cluster client routes, and the two share the command methods used here.
    """
    if settings.redis_cluster:
        cluster = RedisCluster.from_url(
            settings.redis_url,
            decode_responses=False,
            socket_connect_timeout=5,
            max_connections=256,
        )
        await cluster.initialize()
        return cast(aioredis.Redis, cluster)
    return aioredis.Redis.from_url(
        settings.redis_url,
        decode_responses=False,
        health_check_interval=15,
        socket_connect_timeout=5,
        max_connections=256,
    )


class Bus:
    """Deliveries to user channels and entries on conversation partition streams."""

    def __init__(
        self, redis: aioredis.Redis, settings: Settings, commands: RespConnection | None = None
    ) -> None:
        self.redis = redis
        self.keys = Keys(settings.namespace)
        self._maxlen = str(settings.user_log_maxlen)
        self._trim = "~" if settings.user_log_maxlen >= APPROXIMATE_TRIM_FROM else "="
        self._log_ttl = str(settings.user_log_ttl)
        self._publish = "SPUBLISH" if settings.redis_cluster else "PUBLISH"
        self._deliver = redis.register_script(_DELIVER)
        self._cluster = settings.redis_cluster
        if self._cluster:
            slot_tags()  # built now (~0.2 s, once per process), not in the first delivery
        # With `commands` (nodes and workers), every delivery, delta and enqueue of the
        # process shares one pipelined connection (common/transport/connection.py);
        # without, each call is a redis-py pipeline of its own.
        self._pipeliner = commands

    async def deliver(
        self, user_ids: Iterable[str], body: bytes, delivery_key: str | None = None
    ) -> dict[str, int]:
        """Log and publish a seq frame to each user; returns each user's seq for it.

        `body` is an encoded frame without its leading ``{``. With a `delivery_key`
        the same delivery made twice keeps its first seq and is published once.
        """
        users = list(dict.fromkeys(user_ids))
        if not users:
            return {}
        groups = self._groups(users)
        calls = [self._call(tag, group, body, delivery_key) for tag, group in groups]
        if self._pipeliner is not None:
            replies = await self._run_shared(calls)
        elif self._cluster:
            # A cluster pipeline cannot load a missing script on the shard it lands
            # on, and a retry could publish twice on shards that did run it: EVAL
            # carries the body (Redis caches it compiled).
            replies = await self._run(calls, by_sha=False)
        else:
            try:
                replies = await self._run(calls, by_sha=True)
            except NoScriptError:
                # Redis restarted or flushed its scripts: nothing ran, so run it again.
                await self.redis.script_load(_DELIVER)
                replies = await self._run(calls, by_sha=True)
        return {
            user: int(seq)
            for (_, group), seqs in zip(groups, replies, strict=True)
            for user, seq in zip(group, seqs, strict=True)
        }

    def _groups(self, users: list[str]) -> list[tuple[str, list[str]]]:
        """The users in script calls of at most USERS_PER_CALL, each with its marker's tag.

        On Redis Cluster a script touches one slot: a call serves the users of one slot
        and its marker carries that slot's tag, the same whichever users a retry of the
        delivery groups together.
        """
        if not self._cluster:
            step = USERS_PER_CALL
            return [("", users[i : i + step]) for i in range(0, len(users), step)]
        by_slot: dict[int, list[str]] = {}
        for user in users:
            by_slot.setdefault(key_slot(self.keys.seq(user).encode()), []).append(user)
        tags = slot_tags()
        return [
            (tags[slot], members[i : i + USERS_PER_CALL])
            for slot, members in by_slot.items()
            for i in range(0, len(members), USERS_PER_CALL)
        ]

    def _call(
        self, tag: str, users: list[str], body: bytes, delivery_key: str | None
    ) -> tuple[list[str], list[Any]]:
        keys = [self.keys.delivered(tag, delivery_key or "-")]
        for user in users:
            keys += (self.keys.seq(user), self.keys.log(user), self.keys.user_channel(user))
        keyed = "1" if delivery_key else "0"
        args = [body, self._trim, self._maxlen, self._log_ttl, SEQ_TTL, keyed, self._publish]
        return keys, args + users

    async def _run_shared(self, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """The delivery script for each call, in the pipeline shared with other callers.

        EVALSHA, not a Script object: in a pipeline that makes redis-py send SCRIPT
        EXISTS first, a second round trip per delivery.
        """
        replies = await self._evalsha_all(calls)
        redo = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if redo:
            # Redis restarted or flushed its scripts: those calls did not run; again.
            await self.redis.script_load(_DELIVER)
            for i, reply in zip(
                redo, await self._evalsha_all([calls[i] for i in redo]), strict=True
            ):
                replies[i] = reply
        _raise_first(replies)
        return replies

    async def _evalsha_all(self, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        assert self._pipeliner is not None
        submit, sha = self._pipeliner.submit, self._deliver.sha
        pending = [submit("EVALSHA", sha, len(keys), *keys, *args) for keys, args in calls]
        return list(await asyncio.gather(*pending, return_exceptions=True))

    async def _run(self, calls: list[tuple[list[str], list[Any]]], *, by_sha: bool) -> list[Any]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                if by_sha:
                    pipe.evalsha(self._deliver.sha, len(keys), *keys, *args)
                else:
                    pipe.eval(_DELIVER, len(keys), *keys, *args)
            result: list[Any] = await pipe.execute()
        return result

    @property
    def pipelined(self) -> bool:
        """Whether commands share one ordered connection (then `publish_soon` is allowed)."""
        return self._pipeliner is not None

    def publish_soon(
        self, user_ids: Iterable[str], frame: bytes, *, skip: tuple[str, str] | None = None
    ) -> Awaitable[None]:
        """Send an ephemeral frame now, in order with this process's other commands;
        await the outcome later (streamed deltas: many in flight, one write)."""
        assert self._pipeliner is not None, "only on a shared connection (see `pipelined`)"
        submit, publish = self._pipeliner.submit, self._publish
        sent = [
            submit(publish, self.keys.user_channel(user), _skipping(frame, user, skip))
            for user in dict.fromkeys(user_ids)
        ]
        return _all_of(sent)

    async def publish(
        self, user_ids: Iterable[str], frame: bytes, *, skip: tuple[str, str] | None = None
    ) -> None:
        """Publish an ephemeral frame (no seq) to users; `skip` = (user, device) not echoed to."""
        if self._pipeliner is not None:
            await self.publish_soon(user_ids, frame, skip=skip)
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for user in dict.fromkeys(user_ids):
                pipe.execute_command(
                    self._publish, self.keys.user_channel(user), _skipping(frame, user, skip)
                )
            await pipe.execute()

    async def current_seq(self, user_id: str) -> int:
        key = self.keys.seq(user_id)
        if self._pipeliner is not None:
            raw = await self._pipeliner.call("GET", key)
        else:
            raw = await self.redis.get(key)
        return int(raw) if raw else 0

    async def log_after(self, user_id: str, after: int, limit: int | None = None) -> list[bytes]:
        """Logged frames of a user with seq > after (at most `limit`), oldest first."""
        entries: Any = await self.redis.xrange(
            self.keys.log(user_id), min=f"{after + 1}-0", max="+", count=limit
        )
        return [fields[b"f"] for _, fields in entries]

    async def enqueue(self, partition: int, entry: bytes) -> bytes:
        """Append client input to a conversation partition stream; the id once durable."""
        stream = self.keys.partition_stream(partition)
        entry_id: Any
        if self._pipeliner is not None:
            entry_id = await self._pipeliner.call("XADD", stream, "*", "c", entry)
        else:
            entry_id = await self.redis.xadd(stream, {"c": entry})
        return bytes(entry_id)


async def _all_of(sent: list[asyncio.Future[Any]]) -> None:
    _raise_first(await asyncio.gather(*sent, return_exceptions=True))


def _raise_first(results: list[Any]) -> None:
    """Every command got its own reply or error; the first error is the call's."""
    for result in results:
        if isinstance(result, BaseException):
            raise result


def _skipping(frame: bytes, user: str, skip: tuple[str, str] | None) -> bytes:
    return skip_device(frame, skip[1]) if skip is not None and skip[0] == user else frame
