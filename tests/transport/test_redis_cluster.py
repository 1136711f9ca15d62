"""Redis Cluster mode: sharded pub/sub for user channels, every multi-key step in one slot.

Starts a real 3-primary Redis Cluster of its own on free loopback ports (redis-server
processes, slots assigned and nodes introduced with CLUSTER commands), runs two nodes
and two workers against it, and passes the cross-node delivery and resume paths.
"""

from __future__ import annotations

import asyncio

from redis.crc import key_slot

from common.transport.keys import Keys
from tests.support.checker import Flow, check, devices
from tests.support.harness import Cluster, connect, create_session, is_type


def test_one_users_keys_share_a_slot() -> None:
    keys = Keys("ns:")
    for user in ("alice", "bob", "we{ird"):
        slots = {
            key_slot(k.encode())
            for k in (
                keys.user_channel(user),
                keys.seq(user),
                keys.log(user),
                keys.delivered(user, "m1"),
                keys.devices(user),
                keys.device_conns(user),
            )
        }
        assert len(slots) == 1, (user, slots)


async def test_cross_node_delivery_and_resume_on_redis_cluster(
    cluster: Cluster, redis_cluster: str, settings: object
) -> None:
    cluster.env = {**cluster.env, "FANOUT_REDIS_URL": redis_cluster, "FANOUT_REDIS_CLUSTER": "1"}
    node1, node2 = await asyncio.gather(cluster.node(), cluster.node())
    await asyncio.gather(cluster.worker(), cluster.worker())
    session_id = await create_session(node1, "alice", ["bob"])
    async with (
        connect(node1, "alice", "a1") as a1,
        connect(node2, "alice", "a2") as a2,
        connect(node2, "bob", "b1") as b1,
    ):
        msg_id = await a1.chat(session_id, "over the cluster")
        await a1.until(is_type("ack", id=msg_id))
        got = [
            await c.until(is_type("message", message__client_msg_id=msg_id)) for c in (a1, a2, b1)
        ]
        assert got[0]["seq"] == got[1]["seq"]
        for client in (a1, a2, b1):
            reply = await client.until(is_type("message", message__role="assistant"))
            assert reply["message"]["content"] == "You said: over the cluster"
        last = a2.frames[-1]["seq"]
    # Resume on the other node after missing a message.
    async with connect(node1, "bob", "b1") as bob:
        msg_id = await bob.chat(session_id, "while alice is away")
        await bob.until(is_type("message", message__role="assistant"))
    async with connect(node1, "alice", "a2", last_seq=str(last)) as again:
        resumed = await again.until(is_type("resumed"))
        assert resumed["complete"] is True and resumed["to"] > last
        replayed = [f for f in again.frames if f["type"] == "message"]
        assert [f["message"]["content"] for f in replayed] == [
            "while alice is away",
            "You said: while alice is away",
        ]


async def test_flow_through_the_cluster_loses_nothing(
    cluster: Cluster, redis_cluster: str, settings: object
) -> None:
    from dataclasses import replace

    from common.config import Settings

    assert isinstance(settings, Settings)
    cluster.env = {**cluster.env, "FANOUT_REDIS_URL": redis_cluster, "FANOUT_REDIS_CLUSTER": "1"}
    node1, node2 = await asyncio.gather(cluster.node(), cluster.node())
    users = [f"c{i}" for i in range(30)]
    cluster_settings = replace(settings, redis_url=redis_cluster, redis_cluster=True)
    async with devices([node1.ws_url, node2.ws_url], users, per_user=2) as devs:
        await Flow(cluster_settings, users).run(rate=300, duration=2)
        report = await check(devs, cluster_settings)
        print(f"cluster flow: {report}")
        report.assert_clean()
        assert report.delivered > 0


async def test_keyed_delivery_keeps_its_seqs_however_a_retry_groups_its_users(
    redis_cluster: str, settings: object
) -> None:
    from dataclasses import replace

    from common.config import Settings
    from common.transport.bus import Bus, connect_redis

    assert isinstance(settings, Settings)
    on_cluster = replace(settings, redis_url=redis_cluster, redis_cluster=True)
    keys = Keys(on_cluster.namespace)
    # Two users whose keys share a slot: one script call serves both.
    by_slot: dict[int, str] = {}
    for i in range(5000):
        user = f"s{i}"
        slot = key_slot(keys.seq(user).encode())
        if slot in by_slot:
            pair = [by_slot[slot], user]
            break
        by_slot[slot] = user
    others = [f"o{i}" for i in range(20)]
    client = await connect_redis(on_cluster)
    try:
        bus = Bus(client, on_cluster)
        body = b'"type":"notification"}'
        await bus.deliver([pair[1]], body)  # seq 1 for the second of the pair
        first = await bus.deliver([pair[0], *others], body, "m7")
        assert first == {pair[0]: 1, **dict.fromkeys(others, 1)}
        # Retried after a crash with the pair together (one call, one marker for their
        # slot) and fewer others: who had it keeps the seq, the one who had not gets it.
        again = await bus.deliver([*pair, *others[:5]], body, "m7")
        assert again == {pair[0]: 1, pair[1]: 2, **dict.fromkeys(others[:5], 1)}
        assert await bus.deliver(pair, body, "m7") == {pair[0]: 1, pair[1]: 2}
        assert [len(await bus.log_after(u, 0)) for u in pair] == [1, 2]
    finally:
        await client.aclose()


async def test_worker_announcements_wake_workers_on_redis_cluster(
    redis_cluster: str, settings: object
) -> None:
    from dataclasses import replace

    from common.config import Settings
    from common.transport.bus import connect_redis
    from worker.leases import PartitionLeases

    assert isinstance(settings, Settings)
    on_cluster = replace(settings, redis_url=redis_cluster, redis_cluster=True)
    client = await connect_redis(on_cluster)
    try:
        keys = Keys(on_cluster.namespace)
        one, two = (
            PartitionLeases(client, keys, worker_id=w, partitions=4, ttl=5) for w in ("w1", "w2")
        )
        after = await one.last_change()
        waiting = asyncio.create_task(one.next_change(after, block=5))
        await asyncio.sleep(0.2)
        assert await two.live_workers() == 1  # w2 joins: it announces that
        changed, newest = await asyncio.wait_for(waiting, 5)
        assert changed and newest != after
        await one.announce("released")  # its own announcement does not wake it
        assert (await one.next_change(newest, block=0.2))[0] is False
    finally:
        await client.aclose()
