"""Session lifecycle end to end: racing PATCHes, expiry by the sweeper, one sweeper at a time."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Callable
from typing import Any

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis

from common.transport.keys import Keys
from tests.sessions.test_sessions_api import db_row
from tests.support.api import patch
from tests.support.harness import Client, Cluster, connect, create_session, is_type


async def seen_or_until(
    client: Client, match: Callable[[dict[str, Any]], bool], timeout: float = 10
) -> dict[str, Any]:
    """A frame already received that matches, or the next one that does."""
    for frame in client.frames:
        if match(frame):
            return frame
    return await client.until(match, timeout)


def session_frames(client: Client, session_id: str) -> list[dict[str, Any]]:
    return [f for f in client.frames if f["type"] == "session" and f["session_id"] == session_id]


async def test_twenty_racing_patches_one_wins_and_everyone_agrees(
    cluster: Cluster, database_url: str
) -> None:
    node1, node2 = await asyncio.gather(cluster.node(), cluster.node())
    session_id = await create_session(node1, "olive", ["pete"])
    async with (
        connect(node1, "olive", "o1") as o1,
        connect(node2, "olive", "o2") as o2,
        connect(node2, "pete", "p1") as p1,
    ):
        code, _ = await patch(node1, session_id, "olive", status="running")
        assert code == 200
        for device in (o1, o2, p1):
            await device.until(is_type("session", session_id=session_id, status="running"))

        # From running, each of these is legal; once one lands, none of the rest is.
        targets = ["completed"] * 7 + ["cancelled"] * 7 + ["failed"] * 6
        results = await asyncio.gather(
            *(
                patch((node1, node2)[i % 2], session_id, ("olive", "pete")[i % 2], status=t)
                for i, t in enumerate(targets)
            )
        )
        codes = sorted(code for code, _ in results)
        assert codes == [200] + [409] * 19, codes
        winner = next(body["status"] for code, body in results if code == 200)
        for code, body in results:
            if code == 409:
                assert body["error"]["code"] == "CONFLICT"
                assert body["error"]["message"].startswith(f"session is {winner}")

        row = await db_row(database_url, session_id)
        assert row is not None
        assert row["status"] == winner
        assert row["version"] == 3 and row["announced_version"] == 3  # created, running, final

        for device in (o1, o2, p1):
            await device.until(is_type("session", session_id=session_id, status=winner))
            await device.drain(0.5)
            statuses = [f["status"] for f in session_frames(device, session_id)]
            assert statuses == ["running", winner], statuses
        for device in (o1, o2, p1):
            seqs = [f["seq"] for f in device.frames if "seq" in f]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "no gap, no duplicate"
        assert [f["seq"] for f in o1.frames if "seq" in f] == [
            f["seq"] for f in o2.frames if "seq" in f
        ]


async def test_a_session_with_a_two_second_ttl_expires_by_itself(
    cluster: Cluster, database_url: str
) -> None:
    node = await cluster.node()
    await cluster.worker(FANOUT_SWEEP_INTERVAL="0.2")
    session_id = await create_session(node, "ezra", ["finn"], ttl=2)
    untouched = await create_session(node, "ezra", ttl=2)
    async with (
        connect(node, "ezra", "e1") as e1,
        connect(node, "ezra", "e2") as e2,
        connect(node, "finn", "f1") as f1,
    ):
        await e1.chat(session_id, "hello")
        await e1.until(is_type("message", message__role="assistant"))
        active_at = time.monotonic()  # the message restarted the 2 s TTL

        for device in (e1, e2, f1):
            frame = await seen_or_until(
                device, is_type("session", session_id=session_id, status="expired")
            )
            assert frame["seq"] > 0
        waited = time.monotonic() - active_at
        assert 1.0 < waited < 5.0, f"expired {waited:.2f}s after the last activity"
        for device in (e1, e2):
            await seen_or_until(device, is_type("session", session_id=untouched, status="expired"))

        for sid in (session_id, untouched):
            row = await db_row(database_url, sid)
            assert row is not None and row["status"] == "expired"
        msg_id = await f1.chat(session_id, "anyone there?")
        error = await f1.until(is_type("error", id=msg_id))
        assert error["code"] == "SESSION_CLOSED" and error["retry"] is False
        assert not any(f["type"] == "ack" and f.get("id") == msg_id for f in f1.frames)
        code, body = await patch(node, session_id, "ezra", status="running")
        assert code == 409 and body["error"]["code"] == "CONFLICT"


async def _sweeps(redis: aioredis.Redis, keys: Keys) -> list[dict[str, Any]]:
    raw = await redis.lrange(keys.sweeps, 0, -1)  # type: ignore[misc]
    return sorted((orjson.loads(r) for r in raw), key=lambda s: s["started"])


def _assert_never_overlapping(sweeps: list[dict[str, Any]]) -> None:
    for before, after in itertools.pairwise(sweeps):
        assert after["started"] >= before["finished"], (before, after)


async def test_the_sweeper_runs_on_one_worker_at_a_time(
    cluster: Cluster, database_url: str, redis: aioredis.Redis, namespace: str
) -> None:
    keys = Keys(namespace)
    node = await cluster.node()
    workers = {
        name: await cluster.worker(name, FANOUT_SWEEP_INTERVAL="0.1")
        for name in ("worker-a", "worker-b")
    }
    await asyncio.sleep(2.5)
    holder = (await redis.get(keys.sweeper_lease) or b"").decode()
    assert holder in workers
    sweeps = await _sweeps(redis, keys)
    assert len(sweeps) >= 5
    assert {s["worker"] for s in sweeps} == {holder}, "only the lease holder sweeps"
    _assert_never_overlapping(sweeps)

    # The holder dies without a word; the other one takes over within the lease time.
    doomed = [await create_session(node, "gus", ttl=1) for _ in range(3)]
    workers[holder].kill()
    killed_at = time.time()
    survivor = next(name for name in workers if name != holder)
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        sweeps = await _sweeps(redis, keys)
        if any(s["worker"] == survivor for s in sweeps):
            break
        await asyncio.sleep(0.1)
    took_over = min(s["started"] for s in sweeps if s["worker"] == survivor)
    assert took_over - killed_at < 2 + 1.0, "within the lease time (FANOUT_LEASE_TTL=2)"
    _assert_never_overlapping(sweeps)
    assert (await redis.get(keys.sweeper_lease)) == survivor.encode()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        rows = [await db_row(database_url, sid) for sid in doomed]
        if all(r is not None and r["status"] == "expired" for r in rows):
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("the surviving worker did not expire the overdue sessions")


async def test_a_graceful_stop_hands_the_sweeper_over_at_once(
    cluster: Cluster, redis: aioredis.Redis, namespace: str
) -> None:
    keys = Keys(namespace)
    first = await cluster.worker("worker-a", FANOUT_SWEEP_INTERVAL="0.1", FANOUT_LEASE_TTL="30")
    await asyncio.sleep(0.5)
    assert (await redis.get(keys.sweeper_lease)) == b"worker-a"
    await cluster.worker("worker-b", FANOUT_SWEEP_INTERVAL="0.1", FANOUT_LEASE_TTL="30")
    assert first.terminate() == 0
    deadline = time.monotonic() + 5  # far less than the 30 s lease: it was released
    while time.monotonic() < deadline:
        if await redis.get(keys.sweeper_lease) == b"worker-b":
            return
        await asyncio.sleep(0.1)
    pytest.fail("the sweeper lease was not handed over on SIGTERM")


async def test_a_change_whose_announcement_was_lost_is_announced_by_the_sweeper(
    cluster: Cluster, database_url: str
) -> None:
    node = await cluster.node()
    await cluster.worker(FANOUT_SWEEP_INTERVAL="0.2")
    session_id = await create_session(node, "ivan")
    async with connect(node, "ivan", "i1") as ivan:
        # As if the process that committed this change died before announcing it.
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(
                "UPDATE sessions SET status = 'paused', version = version + 1,"
                " updated_at = now() WHERE id = $1",
                uuid.UUID(session_id),
            )
        finally:
            await conn.close()
        frame = await ivan.until(is_type("session", session_id=session_id), timeout=10)
        assert frame["status"] == "paused"
        await ivan.drain(0.5)
        assert len(session_frames(ivan, session_id)) == 1, "announced once"
    row = await db_row(database_url, session_id)
    assert row is not None and row["announced_version"] == row["version"] == 2
