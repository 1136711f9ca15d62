"""Device leases against the real Redis: the chunked refresh keeps held devices alive,
lets the others lapse, and never brings a released device back; a dead node run's
devices are offline and make room at the device limit."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import astuple, dataclass

import pytest
import redis.asyncio as aioredis

from common.transport.connection import RespConnection, address_of
from common.transport.keys import Keys
from node.presence import _RENEW, RENEW_CHUNK, DeviceRegistry, Holder

LEASE = 10.0


@dataclass(frozen=True)
class Held:
    """A held device as the refresh sees a connection."""

    user_id: str
    device_id: str
    conn_id: str


def registry(
    redis: aioredis.Redis,
    namespace: str,
    *,
    cluster: bool,
    commands: RespConnection | None = None,
) -> DeviceRegistry:
    return DeviceRegistry(
        redis,
        Keys(namespace),
        node_id="n1",
        lease_ttl=LEASE,
        max_devices=5,
        cluster=cluster,
        commands=commands,
    )


# The forms a node uses: the script through redis-py, the script on the node's shared
# pipelined connection, and per-device commands (Redis Cluster; runs on a plain Redis).
FORMS = ["script", "shared", "per-device"]


@pytest.fixture(params=FORMS)
async def devices(
    request: pytest.FixtureRequest, redis: aioredis.Redis, namespace: str
) -> AsyncIterator[DeviceRegistry]:
    form = request.param
    commands = RespConnection(address_of(redis)) if form == "shared" else None
    try:
        yield registry(redis, namespace, cluster=form == "per-device", commands=commands)
    finally:
        if commands is not None:
            await commands.close()


async def lease_ends(redis: aioredis.Redis, keys: Keys, user: str, device: str) -> float | None:
    return await redis.zscore(keys.devices(user), device)


async def test_refresh_renews_every_held_device_across_chunks(
    redis: aioredis.Redis, namespace: str, devices: DeviceRegistry
) -> None:
    keys = Keys(namespace)
    # More devices than two chunks hold, two per user, as a node holds them.
    held = [Held(f"u{i // 2}", f"d{i % 2}", f"c{i}") for i in range(2 * RENEW_CHUNK + 31)]
    for h in held:
        assert (await devices.claim(h.user_id, h.device_id, h.conn_id)).came_online
    # Make every lease nearly spent, as if the last refresh was long ago.
    nearly_spent = int(time.time() * 1000) + 500
    for h in held:
        await redis.zadd(keys.devices(h.user_id), {h.device_id: nearly_spent}, xx=True)

    before = int(time.time() * 1000)
    assert await devices.refresh(held, spread=0.05) == []

    for user, device, _ in (astuple(h) for h in held):
        ends = await lease_ends(redis, keys, user, device)
        assert ends is not None and ends >= before + LEASE * 1000, (user, device)
        assert await redis.ttl(keys.devices(user)) > LEASE
        assert await redis.ttl(keys.device_conns(user)) > LEASE
    assert {d["device_id"] for d in await devices.online("u0")} == {"d0", "d1"}


async def test_refresh_leaves_other_nodes_devices_to_lapse_and_released_ones_gone(
    redis: aioredis.Redis, namespace: str, devices: DeviceRegistry
) -> None:
    keys = Keys(namespace)
    assert (await devices.claim("ann", "phone", "c1")).came_online
    assert (await devices.claim("ann", "laptop", "c2")).came_online
    assert (await devices.claim("ann", "tablet", "c3")).came_online
    # The laptop's node died: its lease ran out and nobody renews it.
    await redis.zadd(keys.devices("ann"), {"laptop": int(time.time() * 1000) - 1}, xx=True)
    # The tablet disconnected cleanly, after this node took its list of held devices.
    assert await devices.release("ann", "tablet", "c3")

    await devices.refresh([Held("ann", "phone", "c1"), Held("ann", "tablet", "c3")])

    assert [d["device_id"] for d in await devices.online("ann")] == ["phone"]
    assert await lease_ends(redis, keys, "ann", "tablet") is None, "a released device came back"


async def test_refresh_of_nothing_sends_nothing(redis: aioredis.Redis, namespace: str) -> None:
    await registry(redis, namespace, cluster=False).refresh([], spread=1.0)
    assert [k async for k in redis.scan_iter(match=f"{namespace}*")] == []


async def test_a_second_claim_of_a_device_names_the_holder_it_replaces(
    devices: DeviceRegistry,
) -> None:
    first = await devices.claim("bo", "phone", "c1")
    assert first.came_online and first.replaced is None
    second = await devices.claim("bo", "phone", "c2")
    assert second.status == 0 and second.replaced == Holder("c1", "n1")
    assert [d["connection_id"] for d in await devices.online("bo")] == ["c2"]
    # The replaced connection's release leaves the device to its new holder.
    assert not await devices.release("bo", "phone", "c1")
    assert await devices.release("bo", "phone", "c2")
    assert await devices.online("bo") == []


async def test_refresh_returns_the_held_connections_whose_device_is_held_by_another(
    redis: aioredis.Redis, namespace: str, devices: DeviceRegistry
) -> None:
    keys = Keys(namespace)
    old, kept = Held("cy", "phone", "c1"), Held("cy", "laptop", "c2")
    for h in (old, kept):
        await devices.claim(h.user_id, h.device_id, h.conn_id)
    await devices.claim("cy", "phone", "c9")  # its `replace` command was lost
    assert await devices.refresh([old, kept]) == [old]
    # The newer holder's lease is left as it was, the held one's renewed.
    assert sorted(d["connection_id"] for d in await devices.online("cy")) == ["c2", "c9"]
    assert await lease_ends(redis, keys, "cy", "laptop") is not None


async def test_refresh_renews_users_whose_ids_need_escaping_or_are_not_ascii(
    redis: aioredis.Redis, namespace: str, devices: DeviceRegistry
) -> None:
    # The shared connection's renewal encodes keys itself (_renew_command): a user id
    # with braces (escaped in the hash tag) or multi-byte characters must land on the
    # same keys as a claim's.
    keys = Keys(namespace)
    held = [Held("{ü}%", "téléphone", "c1"), Held("日本", "d", "c2"), Held("a}b{", "x", "c3")]
    for h in held:
        assert (await devices.claim(h.user_id, h.device_id, h.conn_id)).came_online
        await redis.zadd(keys.devices(h.user_id), {h.device_id: 1}, xx=True)
    before = int(time.time() * 1000)
    assert await devices.refresh(held) == []
    for h in held:
        ends = await lease_ends(redis, keys, h.user_id, h.device_id)
        assert ends is not None and ends >= before + LEASE * 1000, h


async def test_refresh_loads_its_script_when_redis_does_not_have_it(
    redis: aioredis.Redis, namespace: str
) -> None:
    # As after a Redis restart: the renewal script is not in Redis' cache (a body of its
    # own, never loaded: the run's Redis is shared by the tests, so no SCRIPT FLUSH).
    commands = RespConnection(address_of(redis))
    try:
        devices = registry(redis, namespace, cluster=False, commands=commands)
        devices._renew = redis.register_script(f"{_RENEW}\n-- {namespace}\n")
        assert await redis.script_exists(devices._renew.sha) == [False]
        held = Held("dee", "phone", "c1")
        await devices.claim(held.user_id, held.device_id, held.conn_id)
        await redis.zadd(Keys(namespace).devices("dee"), {"phone": 1}, xx=True)
        assert await devices.refresh([held]) == []
        assert (await lease_ends(redis, Keys(namespace), "dee", "phone") or 0) > time.time() * 1000
        assert await redis.script_exists(devices._renew.sha) == [True]
    finally:
        await commands.close()


async def test_a_dead_node_runs_devices_are_offline_and_evicted_at_the_limit(
    redis: aioredis.Redis, namespace: str, devices: DeviceRegistry
) -> None:
    keys = Keys(namespace)
    # Two node runs under the same node id: the first died (its liveness entry ran
    # out), the second is the node restarted. Their devices' own leases are long.
    dead_run = registry(redis, namespace, cluster=False)
    for device in ("d1", "d2", "d3", "d4"):
        assert (await dead_run.claim("eve", device, f"old-{device}")).came_online
    assert (await devices.claim("eve", "d5", "c5")).came_online
    assert len(await devices.online("eve")) == 5
    await redis.zadd(keys.presence_nodes, {dead_run._run: int(time.time() * 1000) - 1})

    assert [d["device_id"] for d in await devices.online("eve")] == ["d5"]
    # At the limit (5) by the devices' own leases: the dead run's are evicted, not counted.
    claim = await devices.claim("eve", "d6", "c6")
    assert claim.came_online and claim.replaced is None
    assert sorted(await redis.hkeys(keys.device_conns("eve"))) == [b"d5", b"d6"]
    # A live run's devices still count: four more fill the limit, the next is refused.
    for n in range(7, 10):
        assert (await devices.claim("eve", f"d{n}", f"c{n}")).came_online
    assert (await devices.claim("eve", "d10", "c10")).refused


async def test_a_retired_run_is_offline_at_once_and_a_run_never_announced_counts_dead(
    redis: aioredis.Redis, namespace: str, devices: DeviceRegistry
) -> None:
    keys = Keys(namespace)
    assert (await devices.claim("flo", "phone", "c1")).came_online
    assert [d["node_id"] for d in await devices.online("flo")] == ["n1"]
    await devices.retire()
    assert await devices.online("flo") == []
    # A holder naming a run that is not in the set (forgotten, or lost with Redis' data).
    await devices.announce()
    await redis.hset(keys.device_conns("flo"), "phone", "c1 n9#0123456789ab")
    assert await devices.online("flo") == []


async def test_a_holder_from_before_node_runs_lives_by_its_own_lease(
    redis: aioredis.Redis, namespace: str, devices: DeviceRegistry
) -> None:
    # Written by a node of the previous release (`<connection> <node>`, a 10 s lease
    # renewed per device), as during a rolling upgrade.
    keys = Keys(namespace)
    ends = int(time.time() * 1000) + 10_000
    await redis.zadd(keys.devices("gus"), {"old": ends})
    await redis.hset(keys.device_conns("gus"), "old", "c0 n0")
    assert await devices.online("gus") == [
        {"device_id": "old", "connection_id": "c0", "node_id": "n0"}
    ]
    await redis.zadd(keys.devices("gus"), {"old": int(time.time() * 1000) - 1})
    assert await devices.online("gus") == []


async def test_announce_forgets_runs_dead_longer_than_a_device_lease(
    redis: aioredis.Redis, namespace: str, devices: DeviceRegistry
) -> None:
    keys = Keys(namespace)
    now = int(time.time() * 1000)
    long_dead = now - int(devices.device_lease * 1000) - 1
    await redis.zadd(keys.presence_nodes, {"n0#long": long_dead, "n0#recent": now - 1})
    await devices.announce()
    runs = await redis.zrange(keys.presence_nodes, 0, -1, withscores=True)
    assert {run for run, _ in runs} == {b"n0#recent", devices._run.encode()}
    assert dict(runs)[devices._run.encode()] >= now + LEASE * 1000
    assert 0 < await redis.ttl(keys.presence_nodes) <= devices.device_lease * 3
