"""Leases on Redis keys: a key held by one process at a time, expiring unless renewed.

One mechanism for every "one at a time across the cluster" in fanout: partition
ownership, the expiry sweeper, the stats historian. The value is the holder's id,
so renewing and releasing only ever touch a lease that is still one's own.
"""

from __future__ import annotations

import redis.asyncio as aioredis

# KEYS: lease; ARGV: holder, ttl ms. Take the lease if free, renew it if ours.
_HOLD = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

# KEYS: lease; ARGV: holder. Give the lease up only if it is still ours.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Leases:
    """Leases held by one process (`holder`), each for `ttl` seconds unless renewed."""

    def __init__(self, redis: aioredis.Redis, holder: str, ttl: float) -> None:
        self.holder = holder
        self.ttl_ms = int(ttl * 1000)
        self._hold = redis.register_script(_HOLD)
        self._release = redis.register_script(_RELEASE)

    async def hold(self, key: str) -> bool:
        """Take the lease if it is free or renew it if ours; True while we hold it."""
        return bool(await self._hold(keys=[key], args=[self.holder, self.ttl_ms]))

    async def release(self, key: str) -> None:
        """Give the lease up, if it is still ours, so another process can take it at once."""
        await self._release(keys=[key], args=[self.holder])
