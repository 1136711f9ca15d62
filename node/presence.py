"""The cluster-wide device registry: the device limit per user, presence, and liveness.

Each user has a sorted set of device ids scored by when they expire, and a hash of
which connection (on which node) holds each device. Nodes refresh the scores of the
devices they hold; a node that dies stops refreshing, so its devices drop out within
the lease time and never linger as ghosts.
"""

from __future__ import annotations

import time
from typing import Any

import redis.asyncio as aioredis

from common.keys import Keys

# KEYS: devices zset, device->connection hash
# ARGV: device, holder, now ms, expires ms, max devices, key ttl s
_JOIN = """
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
for _, device in ipairs(expired) do redis.call('HDEL', KEYS[2], device) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
local known = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not known and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[5]) then return -1 end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('EXPIRE', KEYS[2], ARGV[6])
if known then return 0 end
return 1
"""

# KEYS: devices zset, device->connection hash; ARGV: device, holder
_LEAVE = """
if redis.call('HGET', KEYS[2], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 1
end
return 0
"""


class DeviceRegistry:
    """Claims and releases devices of users in Redis."""

    def __init__(
        self, redis: aioredis.Redis, keys: Keys, *, node_id: str, lease_ttl: float, max_devices: int
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._node_id = node_id
        self._lease_ms = int(lease_ttl * 1000)
        self._key_ttl = max(int(lease_ttl * 3), 10)
        self._max_devices = max_devices
        self._join = redis.register_script(_JOIN)
        self._leave = redis.register_script(_LEAVE)

    def _holder(self, conn_id: str) -> str:
        return f"{conn_id} {self._node_id}"

    async def claim(self, user_id: str, device_id: str, conn_id: str) -> int:
        """1: the device came online; 0: it was already (another connection); -1: over the limit."""
        now = int(time.time() * 1000)
        result = await self._join(
            keys=[self._keys.devices(user_id), self._keys.device_conns(user_id)],
            args=[
                device_id,
                self._holder(conn_id),
                now,
                now + self._lease_ms,
                self._max_devices,
                self._key_ttl,
            ],
        )
        return int(result)

    async def release(self, user_id: str, device_id: str, conn_id: str) -> bool:
        """True if the device went offline (this connection was its holder)."""
        result = await self._leave(
            keys=[self._keys.devices(user_id), self._keys.device_conns(user_id)],
            args=[device_id, self._holder(conn_id)],
        )
        return bool(result)

    async def refresh(self, held: list[tuple[str, str]]) -> None:
        """Extend the lease of every (user, device) this node holds, in one pipeline."""
        if not held:
            return
        expires = int(time.time() * 1000) + self._lease_ms
        async with self._redis.pipeline(transaction=False) as pipe:
            for user_id, device_id in held:
                pipe.zadd(self._keys.devices(user_id), {device_id: expires}, xx=True)
                pipe.expire(self._keys.devices(user_id), self._key_ttl)
                pipe.expire(self._keys.device_conns(user_id), self._key_ttl)
            await pipe.execute()

    async def online(self, user_id: str) -> list[dict[str, str]]:
        """The user's live devices across the cluster."""
        now = int(time.time() * 1000)
        devices: list[bytes] = await self._redis.zrangebyscore(  # type: ignore[assignment]
            self._keys.devices(user_id), now, "+inf"
        )
        if not devices:
            return []
        holders: list[Any] = await self._redis.hmget(self._keys.device_conns(user_id), devices)
        out = []
        for device, holder in zip(devices, holders, strict=True):
            conn_id, _, node_id = (holder or b"").decode().partition(" ")
            out.append({"device_id": device.decode(), "connection_id": conn_id, "node_id": node_id})
        return out
