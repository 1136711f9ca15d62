"""Postgres down under a worker: nothing is acknowledged, processing resumes by itself.

Uses a throw-away Postgres cluster of its own on another port (never the shared one),
stopped and started again by the test.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from common.localcluster.embedded import embedded_postgres
from common.store.schema import migrate
from tests.support.harness import (
    Client,
    Cluster,
    Proc,
    connect,
    create_session,
    free_port,
    is_type,
    messages_in_db,
)

DATA = Path(__file__).resolve().parents[2] / ".fanout-data" / "outage"


class OwnPostgres:
    """A Postgres of this test's own that can be stopped and started again."""

    def __init__(self) -> None:
        self.url = f"postgresql://127.0.0.1:{free_port()}/fanout"
        self._running: contextlib.AbstractContextManager[None] | None = None

    async def start(self) -> None:
        running = embedded_postgres(DATA, self.url)
        await asyncio.to_thread(running.__enter__)
        self._running = running

    async def stop(self) -> None:
        running, self._running = self._running, None
        if running is not None:
            await asyncio.to_thread(running.__exit__, None, None, None)


@pytest.fixture
async def own_postgres() -> AsyncIterator[OwnPostgres]:
    DATA.mkdir(parents=True, exist_ok=True)
    pg = OwnPostgres()
    await pg.start()
    await migrate(pg.url)
    try:
        yield pg
    finally:
        await pg.stop()


@pytest.fixture
def env_own(env: dict[str, str], own_postgres: OwnPostgres) -> dict[str, str]:
    return {**env, "FANOUT_DATABASE_URL": own_postgres.url}


async def _ready(proc: Proc) -> int:
    async with aiohttp.ClientSession() as http, http.get(f"{proc.url}/readyz") as resp:
        return resp.status


async def _chat_until_acked(client: Client, session_id: str, content: str) -> str:
    """Send a chat, retrying the same id on UNAVAILABLE (the node could not check the
    session: its cache was cold and Postgres down), as a client should."""
    msg_id = await client.chat(session_id, content)
    for _ in range(100):
        reply = await client.until(lambda f: f.get("id") == msg_id, timeout=15)
        if reply["type"] == "ack":
            return msg_id
        assert reply["code"] == "UNAVAILABLE" and reply["retry"] is True, reply
        await asyncio.sleep(0.2)
        await client.chat(session_id, content, msg_id)
    raise AssertionError("never acked")


async def test_worker_survives_a_postgres_outage(
    cluster: Cluster, own_postgres: OwnPostgres, env_own: dict[str, str]
) -> None:
    cluster.env = env_own
    node = await cluster.node()
    worker = await cluster.worker()
    session_id = await create_session(node, "uma")
    sent: list[str] = []
    async with connect(node, "uma", "u1") as uma:
        for i in range(10):
            sent.append(await uma.chat(session_id, f"before {i}"))
            await uma.until(is_type("ack", id=sent[-1]))
        await uma.until(is_type("message", message__client_msg_id=sent[-1]))

        # A lookup after the last status change leaves the session in the node's cache,
        # so the node can check chats (and ack them) while Postgres is away.
        await uma.send({"type": "typing", "session_id": session_id, "is_typing": False})
        await uma.send({"type": "ping"})
        await uma.until(is_type("pong"))

        await own_postgres.stop()
        during = [await _chat_until_acked(uma, session_id, f"during {i}") for i in range(10)]
        sent += during
        await asyncio.sleep(1.0)
        assert await _ready(worker) == 503, "the worker reports Postgres down"
        assert await _ready(node) == 503, "and so does the node"
        assert not [
            f
            for f in uma.frames
            if f["type"] == "message" and f["message"]["client_msg_id"] in during
        ], "nothing processed yet"
        await asyncio.sleep(2.0)

        await own_postgres.start()
        final = await uma.until(is_type("message", message__client_msg_id=sent[-1]), timeout=30)
        assert final["message"]["content"] == "during 9"
        assert await _ready(worker) == 200
    rows = [
        r["client_msg_id"]
        for r in await messages_in_db(own_postgres.url, session_id)
        if r["role"] == "user"
    ]
    assert rows == sent, "every acked chat stored exactly once, in order"
    delivered = [
        f["message"]["client_msg_id"]
        for f in uma.frames
        if f["type"] == "message" and f["message"]["role"] == "user"
    ]
    assert delivered == sent
    assert "unavailable" in worker.log(), "the worker retried instead of failing entries"
