"""The one-call group commit against the real Postgres: one round trip, and the
session lock still serialises a batch with PATCH transitions."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from common.config import Settings
from common.store.batch import ReplyWrite, write_batch
from common.store.lifecycle import Refused
from common.store.postgres import Store
from common.store.sessions import SessionChanges, SessionDirectory
from common.transport.bus import Bus
from common.transport.connection import command_connection
from common.transport.entries import ChatEntry
from common.transport.keys import Keys
from worker.writer import BatchWriter


def chat(session_id: str, n: int) -> ChatEntry:
    return ChatEntry(session_id, f"c{n}", "ann", "phone", f"hello {n}", {"n": n}, 0)


@pytest.fixture
async def parts(
    redis: aioredis.Redis, settings: Settings
) -> AsyncIterator[tuple[Store, SessionChanges]]:
    async with (
        Store.open(settings.database_url) as store,
        command_connection(redis, cluster=False) as commands,
    ):
        bus = Bus(redis, settings, commands)
        directory = SessionDirectory(redis, store, Keys(settings.namespace), commands)
        yield store, SessionChanges(store, bus, directory)


async def new_session(store: Store) -> str:
    made = await store.create_session(owner="ann", participants=[], agent="ai", ttl=60, metadata={})
    return made.id


async def lock_waiters(store: Store, at_least: int) -> None:
    """Wait until `at_least` backends of this database wait for a lock."""
    for _ in range(500):
        waiting = await store.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        if waiting >= at_least:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"fewer than {at_least} backends wait for a lock")


async def test_a_batch_of_chats_and_replies_is_one_statement(
    parts: tuple[Store, SessionChanges],
) -> None:
    store, _ = parts
    sessions = [await new_session(store) for _ in range(5)]
    queries: list[Any] = []
    async with store.acquire() as conn:
        # The first call on a connection also reads the row types (once per connection).
        first, _ = await write_batch(conn, [chat(s, 1) for s in sessions], [])
        replies = [
            ReplyWrite(w.message.session_id, w.reply_id, f"reply:{w.message.id}", "assistant", "ok")
            for w in first
            if w is not None and w.reply_id is not None
        ]
        conn.add_query_logger(queries.append)
        written, answered = await write_batch(conn, [chat(s, 2) for s in sessions], replies)
        again, _ = await write_batch(conn, [chat(s, 2) for s in sessions], [])
        conn.remove_query_logger(queries.append)
    assert len(queries) == 2, "each batch is one statement: no BEGIN, no COMMIT"
    assert len(answered) == 5 and all(m.role == "assistant" for m in answered)
    assert all(w is not None and w.created and w.message.metadata == {"n": 2} for w in written)
    assert [w.message if w else None for w in again] == [w.message if w else None for w in written]
    assert all(w is not None and not w.created and w.reply_id is None for w in again)


async def test_a_batch_waiting_for_a_patch_sees_its_result(
    parts: tuple[Store, SessionChanges], database_url: str
) -> None:
    store, _ = parts
    session_id = await new_session(store)
    writer = BatchWriter(store)
    started = await writer.chat(chat(session_id, 1))
    assert started is not None and started.session.status == "running"
    patch = await asyncpg.connect(database_url)
    try:
        # A PATCH to `completed`, committed only once the batch waits for its lock.
        tx = patch.transaction()
        await tx.start()
        await patch.execute(
            "UPDATE sessions SET status = 'completed', version = version + 1 WHERE id = $1",
            uuid.UUID(session_id),
        )
        late = asyncio.create_task(writer.chat(chat(session_id, 2)))
        await lock_waiters(store, 1)
        await tx.commit()
        written = await late
    finally:
        await patch.close()
    assert written is not None and written.created, "acked: stored even though it closed"
    assert (written.before.status, written.session.status) == ("completed", "completed")
    assert written.reply_id is None, "a closed session takes no reply"
    assert written.session.expires_at == started.session.expires_at, "and no activity"
    assert written.session.version == started.session.version + 1


@pytest.mark.parametrize(("target", "legal"), [("running", False), ("completed", True)])
async def test_a_patch_racing_a_first_message_is_judged_after_it(
    parts: tuple[Store, SessionChanges], database_url: str, target: str, legal: bool
) -> None:
    store, changes = parts
    # Sessions are locked in id order: the batch locks `first`, then waits for `second`,
    # which a transaction of the test holds. The PATCH of `first` (legal from pending, so
    # its UPDATE matches the row) then queues behind the batch and re-checks after it.
    first, second = sorted([await new_session(store) for _ in range(2)], key=uuid.UUID)
    holder = await asyncpg.connect(database_url)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT 1 FROM sessions WHERE id = $1 FOR UPDATE", uuid.UUID(second))
        writer = BatchWriter(store)
        batch = asyncio.gather(writer.chat(chat(first, 1)), writer.chat(chat(second, 1)))
        await lock_waiters(store, 1)
        patch = asyncio.ensure_future(changes.update(first, status=target))
        await lock_waiters(store, 2)
        await tx.commit()
        written, _ = await batch
        outcome = (await asyncio.gather(patch, return_exceptions=True))[0]
    finally:
        await holder.close()
    assert written is not None and written.created
    assert (written.before.status, written.session.status) == ("pending", "running")
    assert written.reply_id is not None, "the first message of an ai session is answered"
    now = await store.get_session(first)
    assert now is not None
    if legal:  # running -> completed, after the message started it
        assert not isinstance(outcome, BaseException) and outcome is not None
        assert (now.status, now.version) == ("completed", written.session.version + 1)
    else:  # running -> running is no transition: refused, as if it came after
        assert isinstance(outcome, Refused) and outcome.current == "running"
        assert (now.status, now.version) == ("running", written.session.version)
