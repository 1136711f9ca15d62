"""Partitions change hands without a gap (scale-out, scale-in, rolling restarts).

A worker that joins, leaves or releases a partition announces it and every worker waits
on those announcements, so ownership moves at once instead of one renewal interval
(FANOUT_LEASE_TTL / 3) later; a consumer that stops with entries still pending marks
them so the next owner claims them at once instead of after FANOUT_CLAIM_IDLE.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import replace
from types import SimpleNamespace
from typing import cast

import redis.asyncio as aioredis

from common.config import Settings
from common.transport.keys import CONSUMER_GROUP, Keys
from tests.support.harness import Cluster, connect, create_session, is_type, unique
from worker.consumer import PartitionConsumer
from worker.leases import PartitionLeases
from worker.processor import ChatProcessor

PARTITIONS = 8
# A renewal interval of 20 s: a hand-over that waits for one fails these tests.
SLOW_RENEWAL = {"FANOUT_LEASE_TTL": "60", "FANOUT_PARTITIONS": str(PARTITIONS)}
HAND_OVER_WITHIN = 5.0


async def _holders(redis: aioredis.Redis, keys: Keys) -> Counter[str]:
    """How many partition leases each worker holds ("" for a partition nobody holds)."""
    held = await redis.mget([keys.partition_lease(p) for p in range(PARTITIONS)])
    return Counter(h.decode() if h else "" for h in held)


async def _until_held(redis: aioredis.Redis, keys: Keys, want: dict[str, int]) -> float:
    """Seconds until the leases are held exactly as `want` says (fails after the bound)."""
    started = time.monotonic()
    while (held := await _holders(redis, keys)) != Counter(want):
        if time.monotonic() - started > HAND_OVER_WITHIN:
            raise AssertionError(f"partitions held {dict(held)}, wanted {want}")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def test_joining_and_leaving_workers_take_partitions_over_at_once(
    cluster: Cluster, redis: aioredis.Redis, settings: Settings
) -> None:
    cluster.env = {**cluster.env, **SLOW_RENEWAL}
    keys = Keys(settings.namespace)
    node = await cluster.node()
    first, second = unique("wa"), unique("wb")
    await cluster.worker(first)
    await _until_held(redis, keys, {first: PARTITIONS})
    sessions = [await create_session(node, "hana") for _ in range(6)]
    async with connect(node, "hana", "d1") as hana:

        async def every_session_answers() -> None:
            for session_id in sessions:
                msg_id = await hana.chat(session_id, f"to {session_id}")
                await hana.until(is_type("ack", id=msg_id))
                reply = await hana.until(
                    is_type("message", message__role="assistant"), timeout=HAND_OVER_WITHIN
                )
                assert reply["session_id"] == session_id

        await every_session_answers()
        joining = await cluster.worker(second)
        # Scale-out: the owner sheds half at once and the newcomer takes it at once.
        await _until_held(redis, keys, {first: PARTITIONS // 2, second: PARTITIONS // 2})
        await every_session_answers()
        # Scale-in (or a rolling restart's stop): the leaver's partitions go to the other.
        assert joining.terminate() == 0
        await _until_held(redis, keys, {first: PARTITIONS})
        await every_session_answers()


class _NoReplies:
    """A processor's reply runner with no replies in hand."""

    async def release(self, partition: int, grace: float) -> None:
        pass


async def test_a_stopped_consumer_leaves_its_pending_entries_claimable_at_once(
    redis: aioredis.Redis, settings: Settings
) -> None:
    settings = replace(settings, claim_idle=60.0)
    keys = Keys(settings.namespace)
    stream = keys.partition_stream(0)
    await redis.xgroup_create(stream, CONSUMER_GROUP, id="0", mkstream=True)
    entry = await redis.xadd(stream, {"c": b"{}"})
    # The old owner read the entry and did not finish it (it kept failing, say).
    await redis.xreadgroup(CONSUMER_GROUP, "old", {stream: ">"})
    consumer = PartitionConsumer(
        0,
        redis=redis,
        keys=keys,
        settings=settings,
        consumer="old",
        # Stopped (its partition released) before it reads: it processes nothing.
        processor=cast(ChatProcessor, SimpleNamespace(replies=_NoReplies())),
        limit=asyncio.Semaphore(1),
        on_health=lambda _: None,
    )
    consumer.stop()
    await consumer.run()
    # The next owner claims it now, not 60 s (FANOUT_CLAIM_IDLE) from now.
    reply = await redis.xautoclaim(stream, CONSUMER_GROUP, "new", 60_000, "0-0")
    assert [entry_id for entry_id, _ in reply[1]] == [entry]


async def test_workers_racing_for_partitions_take_each_once(
    redis: aioredis.Redis, settings: Settings
) -> None:
    keys = Keys(settings.namespace)
    racers = [
        PartitionLeases(redis, keys, worker_id=w, partitions=PARTITIONS, ttl=10)
        for w in ("r1", "r2", "r3")
    ]
    won = await asyncio.gather(*(r.acquire(PARTITIONS) for r in racers))
    assert sum(len(w) for w in won) == PARTITIONS, won
    assert set().union(*won) == set(range(PARTITIONS)), "every partition taken, none twice"
    assert await _holders(redis, keys) == Counter(
        {r.worker_id: len(w) for r, w in zip(racers, won, strict=True)}
    )
