"""A worker cut off from Redis mid-stream: nothing acked is lost, nothing is stored twice."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import asyncpg
import pytest

from common.localcluster.embedded import Services
from tests.support.harness import Cluster, Proc, connect, create_session, is_type, messages_in_db
from tests.support.proxy import CuttableProxy


@pytest.fixture
async def proxy(services: Services) -> AsyncIterator[CuttableProxy]:
    """A cuttable link to the test Redis; `behind(proxy, services)` is its URL."""
    parts = urlsplit(services.redis_url)
    async with CuttableProxy(parts.hostname or "127.0.0.1", parts.port or 6379) as link:
        yield link


def behind(proxy: CuttableProxy, services: Services) -> str:
    return f"redis://127.0.0.1:{proxy.port}{urlsplit(services.redis_url).path}"


async def test_worker_redis_cut_heals_without_loss_or_repeats(
    cluster: Cluster, services: Services, database_url: str, proxy: CuttableProxy
) -> None:
    node = await cluster.node(FANOUT_RATE="1000", FANOUT_RATE_BURST="1000")
    worker = await cluster.worker(FANOUT_REDIS_URL=behind(proxy, services))
    sessions = [await create_session(node, "wendy") for _ in range(3)]
    sent: dict[str, list[str]] = {s: [] for s in sessions}
    async with connect(node, "wendy", "w1") as wendy:
        is_reply = is_type("message", message__role="assistant")

        def replied() -> set[str]:
            # Every frame received so far: replies that came while an ack was awaited
            # were read (and passed over) by that wait.
            return {f["message"]["client_msg_id"] for f in wendy.frames if is_reply(f)}

        async def reply() -> None:
            await wendy.until(is_reply, timeout=30)

        for i in range(60):
            session_id = sessions[i % 3]
            msg_id = await wendy.chat(session_id, f"chat {i}")
            await wendy.until(is_type("ack", id=msg_id))  # acked: durably enqueued
            sent[session_id].append(msg_id)
            if i == 19:
                if not replied():
                    await reply()  # the worker is at work: now its link to Redis drops
                proxy.cut()
            if i == 39:
                await asyncio.sleep(2.5)  # reads, deliveries and acks fail meanwhile
                proxy.heal()
        while len(replied()) < 60:
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
    assert "consumer crashed" not in worker.log(), "an outage is no crash"


async def test_consumers_ride_out_a_redis_cut_in_place(
    cluster: Cluster, services: Services, database_url: str, proxy: CuttableProxy
) -> None:
    node = await cluster.node(FANOUT_RATE="1000", FANOUT_RATE_BURST="1000")
    # Leases outlive the cut, so nothing but the consumers' own retries can resume
    # the partitions: a crashed consumer would be restarted by a rebalance instead.
    worker = await cluster.worker(FANOUT_REDIS_URL=behind(proxy, services), FANOUT_LEASE_TTL="15")
    await wait_for_log(worker, "consuming partition 3")
    sessions = [await create_session(node, "wendy") for _ in range(4)]
    async with connect(node, "wendy", "w1") as wendy:
        first = await wendy.chat(sessions[0], "before the cut")
        await wendy.until(is_type("message", message__role="assistant"), timeout=30)
        proxy.cut()
        during = []
        for i in range(12):  # acked by the node (its Redis is not cut), queued for later
            msg_id = await wendy.chat(sessions[i % 4], f"during the cut {i}")
            await wendy.until(is_type("ack", id=msg_id))
            during.append(msg_id)
        await asyncio.sleep(3.0)  # reads, deliveries and acks fail meanwhile
        proxy.heal()
        answered: set[str] = set()
        while len(answered) < len(during):
            frame = await wendy.until(is_type("message", message__role="assistant"), timeout=30)
            answered.add(frame["message"]["content"].removeprefix("You said: "))
    assert answered == {f"during the cut {i}" for i in range(12)}
    rows = [r for s in sessions for r in await messages_in_db(database_url, s)]
    assert sorted(r["client_msg_id"] for r in rows if r["role"] == "user") == sorted(
        [first, *during]
    ), "each chat stored once"
    log = worker.log()
    assert "ConnectionError" in log, "the cut reached the worker"
    assert " ERROR " not in log, log
    for partition in range(4):
        assert log.count(f"consuming partition {partition}\n") == 1, "never restarted"
    assert "released partition" not in log
    warnings = [line for line in log.splitlines() if "backing service unavailable" in line]
    # One per partition and activity (stream, entries) at the start; the cut is shorter
    # than the report interval, so no more: not one per retry.
    assert 0 < len(warnings) <= 8, warnings


async def wait_for_log(proc: Proc, text: str, timeout: float = 20) -> None:
    for _ in range(int(timeout * 10)):
        if text in proc.log():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{text!r} not in the log of {proc.name}")
