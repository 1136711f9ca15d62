"""The cluster-wide device registry: the device limit per user, presence, and liveness.

Each user has a sorted set of device ids scored by when they expire, and a hash of
which connection (on which node, and which run of it) holds each device. A device is
online while its score is in the future and the node run holding it is alive.

Liveness is per node, not per device: every node keeps one entry of its own alive in
a sorted set (`Keys.presence_nodes`, its run's id scored by when it lapses), renewed
every third of FANOUT_LEASE_TTL. A node that dies stops renewing it, so its devices
drop out within the lease without any per-device traffic, and never linger as ghosts:
presence reads leave them out, and a claim that would pass the device limit evicts
them. The devices' own scores are a backstop (DEVICE_LEASES node leases, renewed at
half of that), which bounds a device whose node's entry is lost with Redis' data, and
keeps the users' keys from expiring under a long-lived connection. Renewing 10,000
devices every 5 s was most of an idle node's CPU (scripts/bench_idle_cpu.py); the
node's own entry costs one command per renewal whatever it holds.

The device refresh goes in chunks spread over its interval: renewing 5,000 devices
as one 15,000-command pipeline held a node's event loop for tens of milliseconds,
and every delivery on that node waited behind it.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from common.transport.connection import (
    RespConnection,
    command,
    load_script,
    pack_args,
    run_script,
)
from common.transport.keys import Keys, user_tag

# KEYS: devices zset, device->connection hash
# ARGV: device, holder, now ms, expires ms, max devices, key ttl s, then the holders to
#       evict first (their node run is dead)
# Returns {1 came online | 0 was online, the holder it replaces?} or, over the limit,
# {-1, the holders of the devices counted}.
_JOIN = """
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
for _, device in ipairs(expired) do redis.call('HDEL', KEYS[2], device) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
if #ARGV > 6 then
  local dead = {}
  for i = 7, #ARGV do dead[ARGV[i]] = true end
  local held = redis.call('HGETALL', KEYS[2])
  for i = 1, #held, 2 do
    if dead[held[i + 1]] and held[i] ~= ARGV[1] then
      redis.call('HDEL', KEYS[2], held[i])
      redis.call('ZREM', KEYS[1], held[i])
    end
  end
end
local known = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not known and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[5]) then
  return {-1, unpack(redis.call('HVALS', KEYS[2]))}
end
local previous = redis.call('HGET', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('EXPIRE', KEYS[2], ARGV[6])
local status = 1
if known then status = 0 end
if previous and previous ~= ARGV[2] then return {status, previous} end
return {status}
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


# KEYS: the devices zset and device->connection hash of each device, in pairs
# ARGV: expires ms, key ttl s, then the device id and holder of each pair
# Returns the numbers (from 1) of the pairs whose device another connection holds now.
_RENEW = """
local replaced = {}
for n = 1, #KEYS / 2 do
  local devices, holders = KEYS[2 * n - 1], KEYS[2 * n]
  local device, holder = ARGV[2 * n + 1], ARGV[2 * n + 2]
  local current = redis.call('HGET', holders, device)
  if current and current ~= holder then
    table.insert(replaced, n)
  else
    redis.call('ZADD', devices, 'XX', ARGV[1], device)
    redis.call('EXPIRE', devices, ARGV[2])
    redis.call('EXPIRE', holders, ARGV[2])
  end
end
return replaced
"""

# A device's own lease, in node leases (FANOUT_LEASE_TTL): the backstop behind its
# node's liveness, renewed every half of it. It is also how often a node checks that
# the devices it holds are still its own (a `replace` command that was lost).
DEVICE_LEASES = 12

# Devices renewed per round trip: one script call (or, on a Redis Cluster, one
# pipeline) costs the node ~0.5 ms of loop time at this size on the shared
# connection, and Redis about as much. Each call also costs a fixed write, reply and
# wake-up: with 10,000 idle connections, 200 a call rather than 50 cut the node's
# CPU by a third (scripts/bench_idle_cpu.py).
RENEW_CHUNK = 200


class HeldDevice(Protocol):
    """A connection as the lease refresh sees it (node.ws.connection.Connection)."""

    @property
    def user_id(self) -> str: ...

    @property
    def device_id(self) -> str: ...

    @property
    def conn_id(self) -> str: ...


H = TypeVar("H", bound=HeldDevice)


@dataclass(frozen=True, slots=True)
class Holder:
    """The connection that holds a device, and the node it is on."""

    conn_id: str
    node_id: str


@dataclass(frozen=True, slots=True)
class Claim:
    """What claiming a device did."""

    # 1: the device came online; 0: it was online already (another connection, now
    # replaced); -1: refused, the user has the maximum devices.
    status: int
    # The connection that held the device until now: it is to be closed (`replaced`).
    replaced: Holder | None = None

    @property
    def refused(self) -> bool:
        return self.status < 0

    @property
    def came_online(self) -> bool:
        return self.status == 1


class DeviceRegistry:
    """Claims and releases devices of users in Redis."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        *,
        node_id: str,
        lease_ttl: float,
        max_devices: int,
        cluster: bool = False,
        commands: RespConnection | None = None,
    ) -> None:
        self._redis = redis
        # Every connect and disconnect runs a script: on the shared connection when
        # there is one (a connect burst grew redis-py's pool by a connection per claim).
        self._commands = commands
        self._cluster = cluster
        self._keys = keys
        self._node_id = node_id
        # This run of the node: a node restarted under the same FANOUT_NODE_ID is
        # another run, and the devices its previous run held are dead.
        self._run = f"{node_id}#{secrets.token_hex(6)}"
        self._node_lease_ms = int(lease_ttl * 1000)
        self._lease_ms = int(lease_ttl * DEVICE_LEASES * 1000)
        self._key_ttl = max(int(lease_ttl * DEVICE_LEASES * 3), 10)
        self._max_devices = max_devices
        self._announced = False
        self._join = redis.register_script(_JOIN)
        self._leave = redis.register_script(_LEAVE)
        self._renew = redis.register_script(_RENEW)
        # The renewal's keys and holders, encoded straight into RESP (`_renew_command`):
        # the two key prefixes up to the user's hash tag, and the holders' node part.
        self._key_prefixes = (
            keys.devices("").removesuffix("}").encode(),
            keys.device_conns("").removesuffix("}").encode(),
        )
        self._holder_suffix = f" {self._run}".encode()

    @property
    def device_lease(self) -> float:
        """Seconds a device's own lease lasts (its refresh comes every half of it)."""
        return self._lease_ms / 1000

    def _holder(self, conn_id: str) -> str:
        return f"{conn_id} {self._run}"

    async def announce(self) -> None:
        """Keep this node run alive for another lease; forget runs long dead.

        Called every third of the lease, and before the first claim: a device is
        claimed only by a run that is already alive."""
        now = int(time.time() * 1000)
        key = self._keys.presence_nodes
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zadd(key, {self._run: now + self._node_lease_ms})
            # A run missing from the set counts as dead too: its entry can go once no
            # device of it can be alive by its own lease either.
            pipe.zremrangebyscore(key, "-inf", now - self._lease_ms)
            pipe.expire(key, self._key_ttl)
            await pipe.execute()
        self._announced = True

    async def retire(self) -> None:
        """This run stops: its devices are offline at once (after a clean stop there
        are none left; after a failed drain, the ones left behind)."""
        await self._redis.zrem(self._keys.presence_nodes, self._run)

    async def dead(self, holders: Sequence[bytes | str | None]) -> set[str]:
        """The holders (as stored) whose node run is not alive now."""
        runs = {h: _parse_holder(_text(h))[1] for h in holders if h is not None}
        named = sorted({run for run in runs.values() if run})
        if not named:
            return set()
        scores = await self._redis.zmscore(self._keys.presence_nodes, named)
        now = time.time() * 1000
        alive = {run for run, score in zip(named, scores, strict=True) if score and score > now}
        return {_text(h) for h, run in runs.items() if run and run not in alive}

    async def claim(self, user_id: str, device_id: str, conn_id: str) -> Claim:
        """Make `conn_id` the device's holder, unless that would pass the device limit.

        A device has one holder: a second connection of the same (user, device)
        replaces the first, which the caller closes (SPEC §4: 1008 `replaced`). Devices
        of dead node runs count toward the limit no longer: over it, they are evicted
        and the claim is tried again.
        """
        if not self._announced:
            await self.announce()
        reply = await self._run_join(user_id, device_id, conn_id, [])
        if int(reply[0]) < 0:
            evict = sorted(await self.dead(reply[1:]))
            if evict:
                reply = await self._run_join(user_id, device_id, conn_id, evict)
        if int(reply[0]) < 0:
            return Claim(-1)
        replaced = None
        if len(reply) > 1:
            replaced = _parse_holder(_text(reply[1]))[0]
        return Claim(int(reply[0]), replaced)

    async def _run_join(
        self, user_id: str, device_id: str, conn_id: str, evict: list[str]
    ) -> list[Any]:
        now = int(time.time() * 1000)
        keys = [self._keys.devices(user_id), self._keys.device_conns(user_id)]
        args: list[str | int] = [
            device_id,
            self._holder(conn_id),
            now,
            now + self._lease_ms,
            self._max_devices,
            self._key_ttl,
            *evict,
        ]
        if self._commands is not None:
            reply = await run_script(self._commands, self._join, keys, args)
        else:
            reply = await self._join(keys=keys, args=args)
        return list(reply)

    async def release(self, user_id: str, device_id: str, conn_id: str) -> bool:
        """True if the device went offline (this connection was its holder)."""
        keys = [self._keys.devices(user_id), self._keys.device_conns(user_id)]
        args = [device_id, self._holder(conn_id)]
        if self._commands is not None:
            return bool(await run_script(self._commands, self._leave, keys, args))
        return bool(await self._leave(keys=keys, args=args))

    async def refresh(self, held: Sequence[H], *, spread: float = 0.0) -> list[H]:
        """Extend the lease of every device this node holds, RENEW_CHUNK at a time, the
        chunks spread evenly over `spread` seconds (the first one at once); the held
        connections whose device another connection holds now (to be closed: a
        `replace` command for them was lost, or came before they had joined)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        chunks = [held[i : i + RENEW_CHUNK] for i in range(0, len(held), RENEW_CHUNK)]
        replaced: list[H] = []
        for n, chunk in enumerate(chunks):
            await asyncio.sleep(max(0.0, started + spread * n / len(chunks) - loop.time()))
            # The expiry is taken per chunk: a late chunk still gets a full lease.
            expires = int(time.time() * 1000) + self._lease_ms
            if self._cluster:
                replaced += await self._renew_per_device(chunk, expires)
            else:
                replaced += await self._renew_in_script(chunk, expires)
        return replaced

    async def _renew_in_script(self, chunk: Sequence[H], expires: int) -> list[H]:
        if self._commands is not None:
            # On the shared connection, like claims and releases: a redis-py script call
            # cancelled at a SIGTERM was seen to swallow the cancellation, and the
            # node's stop then waited on this refresher until the watchdog.
            renewal = self._renew_command(chunk, expires)
            try:
                numbers = await self._commands.submit_packed(renewal)
            except NoScriptError:
                await load_script(self._commands, self._renew)
                numbers = await self._commands.submit_packed(renewal)
        else:
            keys = [
                k
                for c in chunk
                for k in (self._keys.devices(c.user_id), self._keys.device_conns(c.user_id))
            ]
            args: list[str | int] = [expires, self._key_ttl]
            for c in chunk:
                args += (c.device_id, self._holder(c.conn_id))
            numbers = await self._renew(keys=keys, args=args)
        return [chunk[int(n) - 1] for n in numbers]

    def _renew_command(self, chunk: Sequence[H], expires: int) -> bytes:
        """EVALSHA of _RENEW for `chunk`, each device's keys and holder encoded in one
        step: at 10,000 held devices a node renews 2,000 a second, and `pack`'s
        argument-by-argument encoding was half of the node's CPU for it."""
        devices, conns = self._key_prefixes
        suffix = self._holder_suffix
        keys, pairs = [], []
        for c in chunk:
            tag = user_tag(c.user_id).encode()
            keys.append(
                b"$%d\r\n%s%s}\r\n$%d\r\n%s%s}\r\n"
                % (len(devices) + len(tag) + 1, devices, tag, len(conns) + len(tag) + 1, conns, tag)
            )
            device, holder = c.device_id.encode(), c.conn_id.encode() + suffix
            pairs.append(b"$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(device), device, len(holder), holder))
        head = pack_args(("EVALSHA", self._renew.sha, 2 * len(chunk)))
        lease = pack_args((expires, self._key_ttl))
        return command(5 + 4 * len(chunk), (head, *keys, lease, *pairs))

    async def _renew_per_device(self, chunk: Sequence[H], expires: int) -> list[H]:
        # Redis Cluster: users' keys live on different slots, which one script call
        # cannot span; single-key commands are routed to each user's shard.
        async with self._redis.pipeline(transaction=False) as pipe:
            for c in chunk:
                pipe.hget(self._keys.device_conns(c.user_id), c.device_id)
                pipe.zadd(self._keys.devices(c.user_id), {c.device_id: expires}, xx=True)
                pipe.expire(self._keys.devices(c.user_id), self._key_ttl)
                pipe.expire(self._keys.device_conns(c.user_id), self._key_ttl)
            replies = await pipe.execute()
        holders = replies[::4]
        return [
            c
            for c, holder in zip(chunk, holders, strict=True)
            if holder is not None and _text(holder) != self._holder(c.conn_id)
        ]

    async def online(self, user_id: str) -> list[dict[str, str]]:
        """The user's live devices across the cluster: in their lease, on a live node run."""
        now = int(time.time() * 1000)
        devices: list[bytes] = await self._redis.zrangebyscore(  # type: ignore[assignment]
            self._keys.devices(user_id), now, "+inf"
        )
        if not devices:
            return []
        holders: list[Any] = await self._redis.hmget(self._keys.device_conns(user_id), devices)
        dead = await self.dead(holders)
        out = []
        for device, holder in zip(devices, holders, strict=True):
            if holder is not None and _text(holder) in dead:
                continue
            held, _ = _parse_holder(_text(holder or b""))
            out.append(
                {
                    "device_id": device.decode(),
                    "connection_id": held.conn_id,
                    "node_id": held.node_id,
                }
            )
        return out


def _parse_holder(stored: str) -> tuple[Holder, str]:
    """A stored holder and its node run: `<connection id> <node id>#<run>` (before node
    runs `<connection id> <node id>`, run "": only its device's own lease ends it)."""
    conn_id, _, run = stored.partition(" ")
    node_id, mark, _ = run.rpartition("#")
    return (Holder(conn_id, node_id), run) if mark else (Holder(conn_id, run), "")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
