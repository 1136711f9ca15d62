"""A worker cut off from Redis mid-stream: nothing acked is lost, nothing is stored twice."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import asyncpg

from common.embedded import Services
from tests.harness import Cluster, connect, create_session, is_type, messages_in_db
from tests.proxy import CuttableProxy


async def test_worker_redis_cut_heals_without_loss_or_repeats(
    cluster: Cluster, services: Services, database_url: str
) -> None:
    parts = urlsplit(services.redis_url)
    async with CuttableProxy(parts.hostname or "127.0.0.1", parts.port or 6379) as proxy:
        node = await cluster.node(FANOUT_RATE="1000", FANOUT_RATE_BURST="1000")
        worker = await cluster.worker(
            FANOUT_REDIS_URL=f"redis://127.0.0.1:{proxy.port}{parts.path}"
        )
        sessions = [await create_session(node, "wendy") for _ in range(3)]
        sent: dict[str, list[str]] = {s: [] for s in sessions}
        async with connect(node, "wendy", "w1") as wendy:
            replied: set[str] = set()

            async def reply() -> None:
                frame = await wendy.until(is_type("message", message__role="assistant"), timeout=30)
                replied.add(frame["message"]["client_msg_id"])

            for i in range(60):
                session_id = sessions[i % 3]
                msg_id = await wendy.chat(session_id, f"chat {i}")
                await wendy.until(is_type("ack", id=msg_id))  # acked: durably enqueued
                sent[session_id].append(msg_id)
                if i == 19:
                    await reply()  # the worker is at work: now its link to Redis drops
                    proxy.cut()
                if i == 39:
                    await asyncio.sleep(2.5)  # reads, deliveries and acks fail meanwhile
                    proxy.heal()
            while len(replied) < 60:
                await reply()
        conn = await asyncpg.connect(database_url)
        try:
            assert await conn.fetchval("SELECT count(*) FROM messages") == 120
        finally:
            await conn.close()
    for session_id, ids in sent.items():
        rows = await messages_in_db(database_url, session_id)
        assert [r["client_msg_id"] for r in rows if r["role"] == "user"] == ids, "once, in order"
        replies = [r for r in rows if r["role"] == "assistant"]
        assert len(replies) == len(ids), "one reply per chat, none twice"
    assert "ConnectionError" in worker.log(), "the cut reached the worker"
