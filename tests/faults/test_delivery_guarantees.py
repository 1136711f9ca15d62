"""Idempotent retries, durable queueing without workers, and a worker killed mid-stream."""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict

import asyncpg
import redis.asyncio as aioredis

from common.transport.entries import ChatEntry
from common.transport.keys import Keys, partition_of
from tests.support.harness import (
    Client,
    Cluster,
    connect,
    create_session,
    is_type,
    messages_in_db,
    open_client,
    wait_for_lease_holders,
)


async def test_retried_chat_is_stored_once_with_one_server_id(
    cluster: Cluster, database_url: str
) -> None:
    node1, node2 = await asyncio.gather(cluster.node(), cluster.node())
    await cluster.worker()
    session_id = await create_session(node1, "dave", ["erin"])
    msg_id = str(uuid.uuid4())
    async with connect(node2, "erin", "e1") as erin:
        async with connect(node1, "dave", "d1") as dave:
            for _ in range(2):
                await dave.chat(session_id, "once only", msg_id)
                await dave.until(is_type("ack", id=msg_id))
        # The third retry comes after a reconnect, to the other node.
        async with connect(node2, "dave", "d1") as dave_again:
            await dave_again.chat(session_id, "once only", msg_id)
            await dave_again.until(is_type("ack", id=msg_id))
            await asyncio.sleep(1.0)  # let the worker process all three entries
            await dave_again.drain()
        await erin.drain()
        seen = [
            f
            for f in erin.frames
            if f["type"] == "message" and f["message"]["client_msg_id"] == msg_id
        ]
    rows = [
        r for r in await messages_in_db(database_url, session_id) if r["client_msg_id"] == msg_id
    ]
    assert len(rows) == 1
    assert seen, "erin never got the message"
    assert {f["message"]["id"] for f in seen} == {rows[0]["id"]}
    assert len({f["seq"] for f in seen}) == 1, "one message, one seq per user"
    replies = [
        r for r in await messages_in_db(database_url, session_id) if r["role"] == "assistant"
    ]
    assert len(replies) == 1, "a retried chat is answered once"


async def test_chats_wait_durably_for_a_worker(cluster: Cluster, database_url: str) -> None:
    node = await cluster.node()
    sessions = [await create_session(node, "frank") for _ in range(4)]
    sent: dict[str, list[str]] = defaultdict(list)
    async with connect(node, "frank", "f1", session_id=sessions[0]) as frank:
        for i in range(100):
            session_id = sessions[i % 4]
            msg_id = await frank.chat(session_id, f"queued {i}")
            sent[session_id].append(msg_id)
            await frank.until(is_type("ack", id=msg_id))
            await asyncio.sleep(0.03)  # stay under the per-connection rate limit
        assert not [f for f in frank.frames if f["type"] == "message"], "no worker yet"

        await cluster.worker()
        got: dict[str, list[str]] = defaultdict(list)
        while sum(len(v) for v in got.values()) < 100:
            frame = await frank.until(is_type("message", message__role="user"), timeout=30)
            got[frame["session_id"]].append(frame["message"]["client_msg_id"])
    assert got == sent, "every chat delivered, in order per session"
    for session_id in sessions:
        rows = [
            r["client_msg_id"]
            for r in await messages_in_db(database_url, session_id)
            if r["role"] == "user"
        ]
        assert rows == sent[session_id]


async def _send_stream(client: Client, session_id: str, count: int) -> list[str]:
    ids = []
    for i in range(count):
        ids.append(await client.chat(session_id, f"#{i}"))
    for msg_id in ids:
        await client.until(is_type("ack", id=msg_id), timeout=30)
    return ids


async def test_worker_killed_mid_stream_loses_and_repeats_nothing(
    cluster: Cluster, database_url: str, redis: aioredis.Redis, namespace: str
) -> None:
    node = await cluster.node(FANOUT_RATE="1000", FANOUT_RATE_BURST="1000")
    victim, survivor = await asyncio.gather(cluster.worker(), cluster.worker())
    await wait_for_lease_holders(redis, Keys(namespace), partitions=4, holders=2)
    sessions = [await create_session(node, f"user{i}") for i in range(20)]
    clients = [await open_client(node, f"user{i}", "dev") for i in range(20)]
    try:
        sending = asyncio.gather(
            *(_send_stream(c, s, 25) for c, s in zip(clients, sessions, strict=True))
        )
        conn = await asyncpg.connect(database_url)
        try:
            for _ in range(400):  # kill once the workers are well into the stream
                stored = await conn.fetchval("SELECT count(*) FROM messages WHERE role = 'user'")
                if stored >= 100:
                    break
                await asyncio.sleep(0.05)
            victim.kill()
            sent = await sending
            for _ in range(600):
                stored = await conn.fetchval("SELECT count(*) FROM messages WHERE role = 'user'")
                if stored >= 500:
                    break
                await asyncio.sleep(0.1)
        finally:
            await conn.close()
    finally:
        for client in clients:
            await client.close()
    for session_id, ids in zip(sessions, sent, strict=True):
        rows = [
            r["client_msg_id"]
            for r in await messages_in_db(database_url, session_id)
            if r["role"] == "user"
        ]
        assert rows == ids, "stored exactly once, in send order"
    assert "reclaimed" in survivor.log(), "the dead worker's pending entries were claimed"


async def test_poison_entries_are_dead_lettered_and_the_rest_flows(
    cluster: Cluster, database_url: str, redis: aioredis.Redis, namespace: str
) -> None:
    """An entry that keeps failing goes to the dead-letter stream after FANOUT_MAX_ATTEMPTS
    deliveries; an undecodable one at once; other conversations are not held up."""
    node = await cluster.node()
    await cluster.worker(FANOUT_MAX_ATTEMPTS="3")
    keys = Keys(namespace)
    session_id = await create_session(node, "vic")
    partition = partition_of(session_id, 4)
    stream = keys.partition_stream(partition)
    # Written straight to the stream, as a buggy producer might: the node never would.
    poison = ChatEntry(
        session_id="not-a-uuid",
        client_msg_id="p1",
        user_id="vic",
        device_id="v1",
        content="boom",
        metadata=None,
        accepted_ms=0,
    )
    await redis.xadd(stream, {"c": poison.encode()})
    await redis.xadd(stream, {"c": b"{not json"})
    async with connect(node, "vic", "v1") as vic:
        for i in range(3):
            msg_id = await vic.chat(session_id, f"fine {i}")
            await vic.until(is_type("message", message__client_msg_id=msg_id), timeout=20)
    dead_key = keys.dead_letters(partition)
    for _ in range(100):
        if await redis.xlen(dead_key) >= 2:
            break
        await asyncio.sleep(0.1)
    dead = await redis.xrange(dead_key)
    reasons = sorted(fields[b"reason"].decode()[:20] for _, fields in dead)
    assert len(dead) == 2, dead
    assert any("undecodable" in r for r in reasons)
    for _ in range(50):
        info = await redis.xinfo_groups(stream)
        if info[0]["pending"] == 0:
            break
        await asyncio.sleep(0.1)
    assert info[0]["pending"] == 0, "dead letters are acknowledged, nothing stuck"
