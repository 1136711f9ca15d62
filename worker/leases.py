"""Partition ownership: each conversation partition is leased to one worker at a time.

Workers register with a heartbeat; each takes its fair share, ceil(partitions /
live workers), of the partitions, renews its leases, and gives up the excess when
more workers join. A lease that cannot be renewed in time is treated as lost.
"""

from __future__ import annotations

import math
import random
import time

import redis.asyncio as aioredis

from common.transport.keys import Keys
from common.transport.lease import Leases


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
        """Heartbeat this worker and count the live ones (this one included)."""
        now = int(time.time() * 1000)
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zadd(self._keys.workers, {self.worker_id: now + self._ttl_ms})
            pipe.zremrangebyscore(self._keys.workers, "-inf", now)
            pipe.zcard(self._keys.workers)
            _, _, count = await pipe.execute()
        return max(int(count), 1)

    def fair_share(self, workers: int) -> int:
        return math.ceil(self._partitions / workers)

    async def renew(self) -> set[int]:
        """Renew every owned lease; returns the partitions lost to expiry."""
        started = time.monotonic()
        lost = set()
        for partition in sorted(self.owned):
            if not await self._leases.hold(self._keys.partition_lease(partition)):
                lost.add(partition)
        self.owned -= lost
        self.valid_until = started + self._ttl_ms / 1000
        return lost

    async def acquire(self, wanted: int) -> set[int]:
        """Try to take free partitions until `wanted` are owned; returns the new ones."""
        gained = set()
        free = [p for p in range(self._partitions) if p not in self.owned]
        random.shuffle(free)
        for partition in free:
            if len(self.owned) >= wanted:
                break
            if await self._leases.hold(self._keys.partition_lease(partition)):
                self.owned.add(partition)
                gained.add(partition)
        return gained

    async def release(self, partition: int) -> None:
        self.owned.discard(partition)
        await self._leases.release(self._keys.partition_lease(partition))

    async def leave(self) -> None:
        """Give up every lease and the heartbeat (graceful stop)."""
        for partition in list(self.owned):
            await self.release(partition)
        await self._redis.zrem(self._keys.workers, self.worker_id)
