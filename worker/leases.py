"""Partition ownership: each conversation partition is leased to one worker at a time.

Workers register with a heartbeat; each takes its fair share, ceil(partitions /
live workers), of the partitions, renews its leases, and gives up the excess when
more workers join. A lease that cannot be renewed in time is treated as lost.

Hand-over without a gap: a worker that joins, leaves or releases a partition says so
on the workers' event stream (`announce`), and every worker waits on that stream
(`next_change`) besides its renewal interval, so owners shed partitions the moment a
worker joins and the partitions they release (or a leaving worker's) are taken at
once, not one renewal interval (FANOUT_LEASE_TTL / 3) later.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from typing import Any

import redis.asyncio as aioredis

from common.transport.keys import Keys
from common.transport.lease import Leases

# Announcements kept on the event stream (approximately): readers only need the ones
# since their last read, which is milliseconds ago.
EVENTS_KEPT = 100


class PartitionLeases:
    def __init__(
        self, redis: aioredis.Redis, keys: Keys, *, worker_id: str, partitions: int, ttl: float
    ) -> None:
        self._redis = redis
        self._keys = keys
        self.worker_id = worker_id
        self._partitions = partitions
        self._ttl_ms = int(ttl * 1000)
        self._leases = Leases(redis, worker_id, ttl)
        self.owned: set[int] = set()
        self.valid_until = 0.0

    async def live_workers(self) -> int:
        """Heartbeat this worker and count the live ones (this one included); a worker
        that was not counted yet announces that it joined."""
        now = int(time.time() * 1000)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zadd(self._keys.workers, {self.worker_id: now + self._ttl_ms})
            pipe.zremrangebyscore(self._keys.workers, "-inf", now)
            pipe.zcard(self._keys.workers)
            added, _, count = await pipe.execute()
        if added:
            await self.announce("joined")
        return max(int(count), 1)

    async def announce(self, change: str) -> None:
        """Tell every worker that membership or ownership changed: they rebalance now."""
        await self._redis.xadd(
            self._keys.worker_events,
            {"worker": self.worker_id, "change": change},
            maxlen=EVENTS_KEPT,
            approximate=True,
        )

    async def last_change(self) -> bytes:
        """The id of the newest announcement (where `next_change` starts)."""
        newest: Any = await self._redis.xrevrange(self._keys.worker_events, count=1)
        return bytes(newest[0][0]) if newest else b"0-0"

    async def next_change(self, after: bytes, block: float) -> tuple[bool, bytes]:
        """Wait up to `block` s for announcements after id `after`: whether another
        worker made one, and the id to wait after next."""
        reply: Any = await self._redis.xread(
            {self._keys.worker_events: after}, count=EVENTS_KEPT, block=int(block * 1000)
        )
        if not reply:
            return False, after
        events = reply[0][1]
        others = any(fields.get(b"worker") != self.worker_id.encode() for _, fields in events)
        return others, bytes(events[-1][0])

    def fair_share(self, workers: int) -> int:
        return math.ceil(self._partitions / workers)

    async def renew(self) -> set[int]:
        """Renew every owned lease (all at once); returns the partitions lost to expiry."""
        started = time.monotonic()
        owned = sorted(self.owned)
        held = await asyncio.gather(
            *(self._leases.hold(self._keys.partition_lease(p)) for p in owned)
        )
        lost = {p for p, ok in zip(owned, held, strict=True) if not ok}
        self.owned -= lost
        self.valid_until = started + self._ttl_ms / 1000
        return lost

    async def acquire(self, wanted: int) -> set[int]:
        """Try to take free partitions until `wanted` are owned; returns the new ones.

        A round reads every lease at once to find the free ones, then holds as many
        as are missing at once: a hand-over costs two round trips, not one per
        partition. Another round follows only if another worker won some of them."""
        gained: set[int] = set()
        for _ in range(self._partitions):  # each round takes a partition or sees it taken
            missing = wanted - len(self.owned)
            if missing <= 0:
                break
            others = [p for p in range(self._partitions) if p not in self.owned]
            holders = await asyncio.gather(
                *(self._redis.get(self._keys.partition_lease(p)) for p in others)
            )
            free = [p for p, holder in zip(others, holders, strict=True) if holder is None]
            if not free:
                break
            random.shuffle(free)
            tried = free[:missing]
            held = await asyncio.gather(
                *(self._leases.hold(self._keys.partition_lease(p)) for p in tried)
            )
            won = {p for p, ok in zip(tried, held, strict=True) if ok}
            self.owned |= won
            gained |= won
        return gained

    async def release(self, partition: int) -> None:
        """Give a partition up and say so: another worker takes it at once."""
        self.owned.discard(partition)
        await self._leases.release(self._keys.partition_lease(partition))
        await self.announce("released")

    async def withdraw(self) -> None:
        """Stop counting as a live worker (draining): the others' fair share grows, so
        they take each partition this worker releases as soon as it does."""
        await self._redis.zrem(self._keys.workers, self.worker_id)
        await self.announce("left")

    async def leave(self) -> None:
        """Give up every lease and the heartbeat (graceful stop)."""
        await self._redis.zrem(self._keys.workers, self.worker_id)
        for partition in list(self.owned):
            await self.release(partition)
