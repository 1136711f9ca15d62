"""User ids with braces in Redis Cluster mode (issue 13): one user's keys stay in one slot,
so connect, delivery and resume work for them as for anyone."""

from __future__ import annotations

import asyncio

from tests.support.harness import Cluster, connect, create_session, is_type


async def test_user_ids_with_braces_connect_chat_and_resume_on_redis_cluster(
    cluster: Cluster,
    redis_cluster: str,
) -> None:
    cluster.env = {**cluster.env, "FANOUT_REDIS_URL": redis_cluster, "FANOUT_REDIS_CLUSTER": "1"}
    node1, node2 = await asyncio.gather(cluster.node(), cluster.node())
    await cluster.worker()
    eve, bob = "}eve{", "{bob}x"
    session_id = await create_session(node1, eve, [bob])
    async with connect(node1, eve, "e1") as e1, connect(node2, bob, "b1") as b1:
        msg_id = await e1.chat(session_id, "braces")
        await e1.until(is_type("ack", id=msg_id))
        for client in (e1, b1):
            await client.until(is_type("message", message__client_msg_id=msg_id))
            await client.until(is_type("message", message__role="assistant"))
        last = b1.frames[-1]["seq"]
    async with connect(node1, eve, "e1") as e1:
        msg_id = await e1.chat(session_id, "while bob is away")
        await e1.until(is_type("message", message__role="assistant"))
    async with connect(node2, bob, "b1", last_seq=str(last)) as again:
        resumed = await again.until(is_type("resumed"))
        assert resumed["complete"] is True
        replayed = [f["message"]["content"] for f in again.frames if f["type"] == "message"]
        assert replayed == ["while bob is away", "You said: while bob is away"]
