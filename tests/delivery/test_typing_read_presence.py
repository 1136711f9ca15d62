"""typing, read and presence frames reach exactly the devices SPEC §4 names."""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis

from common.transport.keys import Keys
from tests.support.api import request
from tests.support.harness import Cluster, connect, create_session, is_type, token


async def test_typing_goes_to_everyone_but_the_typing_device(cluster: Cluster) -> None:
    node1, node2 = await asyncio.gather(cluster.node(), cluster.node())
    session_id = await create_session(node1, "wes", ["xena"])
    async with (
        connect(node1, "wes", "w1") as w1,
        connect(node2, "wes", "w2") as w2,
        connect(node2, "xena", "x1") as x1,
    ):
        await w1.send({"type": "typing", "session_id": session_id, "is_typing": True})
        for client in (w2, x1):
            got = await client.until(is_type("typing"))
            assert got == {
                "type": "typing",
                "session_id": session_id,
                "user_id": "wes",
                "device_id": "w1",
                "is_typing": True,
            }
        await w1.send({"type": "ping"})
        await w1.until(is_type("pong"))
        assert not [f for f in w1.frames if f["type"] == "typing"], "not echoed to the typist"


async def test_read_goes_to_all_own_devices_with_seq(cluster: Cluster) -> None:
    node1, node2 = await asyncio.gather(cluster.node(), cluster.node())
    session_id = await create_session(node1, "yuri", ["zoe"])
    async with (
        connect(node1, "yuri", "y1") as y1,
        connect(node2, "yuri", "y2") as y2,
        connect(node2, "zoe", "z1") as z1,
    ):
        await y1.send({"type": "read", "session_id": session_id, "message_id": 42})
        got = [await c.until(is_type("read")) for c in (y1, y2)]
        assert got[0] == got[1]
        assert got[0]["message_id"] == 42 and got[0]["session_id"] == session_id
        assert got[0]["seq"] == y1.welcome["last_seq"] + 1
        await z1.send({"type": "ping"})
        await z1.until(is_type("pong"))
        assert not [f for f in z1.frames if f["type"] == "read"], "read positions are private"


async def test_presence_tells_the_users_other_devices(cluster: Cluster) -> None:
    node1, node2 = await asyncio.gather(cluster.node(), cluster.node())
    async with connect(node1, "abe", "a1") as a1:
        async with connect(node2, "abe", "a2") as a2:
            online = await a1.until(is_type("presence"))
            assert online == {
                "type": "presence",
                "user_id": "abe",
                "device_id": "a2",
                "status": "online",
            }
            await a2.send({"type": "ping"})
            await a2.until(is_type("pong"))
            assert not [f for f in a2.frames if f["type"] == "presence"], "not to itself"
        offline = await a1.until(is_type("presence"))
        assert offline["status"] == "offline" and offline["device_id"] == "a2"


async def test_held_devices_stay_online_across_leases_and_a_killed_nodes_lapse(
    cluster: Cluster,
) -> None:
    # SPEC §3: presence entries expire after FANOUT_LEASE_TTL unless their node renews
    # them: each node keeps its run alive every third of the lease (node/app.py), its
    # devices online while it is. With a 1 s lease, 4 s online is a dozen renewals; a
    # SIGKILLed node renews nothing, and its device is gone within a lease.
    cluster.env = {**cluster.env, "FANOUT_LEASE_TTL": "1"}
    live, doomed = await cluster.node(), await cluster.node()

    async def online() -> set[str]:
        status, body = await request(live, "GET", "/api/v1/presence/lea", auth=token("lea"))
        assert status == 200, body
        return {d["device_id"] for d in body["devices"]}

    async with connect(live, "lea", "phone"), connect(doomed, "lea", "laptop"):
        for _ in range(4):
            await asyncio.sleep(1)
            assert await online() == {"phone", "laptop"}
        doomed.kill()
        async with asyncio.timeout(5):
            while await online() != {"phone"}:
                await asyncio.sleep(0.1)
        await asyncio.sleep(1.5)
        assert await online() == {"phone"}, "the live node's device stays"


async def test_a_node_run_is_alive_while_it_serves_and_gone_after_a_clean_stop(
    cluster: Cluster, redis: aioredis.Redis, namespace: str
) -> None:
    # Presence is per node run (node/presence.py): a serving node keeps its run in
    # presence:nodes a lease ahead, a SIGTERM'd one takes it out as it stops, and a
    # restart under the same FANOUT_NODE_ID is a run of its own.
    keys = Keys(namespace)

    async def runs() -> dict[str, float]:
        found = await redis.zrange(keys.presence_nodes, 0, -1, withscores=True)
        return {r.decode(): s for r, s in found if r.decode().startswith("steady#")}

    async def one_run() -> tuple[str, float]:
        async with asyncio.timeout(5):
            while len(found := await runs()) != 1:
                await asyncio.sleep(0.05)
        return next(iter(found.items()))

    node = await cluster.node("steady")
    async with connect(node, "ria", "phone"):
        first, lapses = await one_run()
        assert lapses > time.time() * 1000  # FANOUT_LEASE_TTL ahead
    assert node.terminate() == 0
    assert await runs() == {}
    node = await cluster.node("steady")
    second, _ = await one_run()
    assert second != first
