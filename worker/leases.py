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

from common.keys import Keys

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class PartitionLeases:
    def __init__(
        self, redis: aioredis.Redis, keys: Keys, *, worker_id: str, partitions: int, ttl: float
    ) -> None:
        self._redis = redis
        self._keys = keys
        self.worker_id = worker_id
        self._partitions = partitions
        self._ttl_ms = int(ttl * 1000)
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)
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
            ok = await self._renew(
                keys=[self._keys.partition_lease(partition)], args=[self.worker_id, self._ttl_ms]
            )
            if not ok:
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
            taken = await self._redis.set(
                self._keys.partition_lease(partition), self.worker_id, nx=True, px=self._ttl_ms
            )
            if taken:
                self.owned.add(partition)
                gained.add(partition)
        return gained

    async def release(self, partition: int) -> None:
        self.owned.discard(partition)
        await self._release(keys=[self._keys.partition_lease(partition)], args=[self.worker_id])

    async def leave(self) -> None:
        """Give up every lease and the heartbeat (graceful stop)."""
        for partition in list(self.owned):
            await self.release(partition)
        await self._redis.zrem(self._keys.workers, self.worker_id)
