"""An entry processed again after a worker died: one row, one reply, one seq per frame.

SPEC §4: "A message is published under exactly one seq per user, also when a worker
dies after publishing and its entry is processed again." These drive the real
processor against the real Redis and Postgres, stopping it at the two places a
crash can leave an entry unacknowledged.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
import pytest
import redis.asyncio as aioredis

from common.config import Settings
from common.store.postgres import Store
from common.store.sessions import SessionDirectory
from common.transport.bus import Bus
from common.transport.connection import command_connection
from common.transport.entries import ChatEntry
from common.transport.keys import Keys
from worker.assistant.echo import EchoAssistant
from worker.assistant.owed import OwedReplies
from worker.assistant.runner import ReplyRunner
from worker.processor import ChatProcessor
from worker.writer import BatchWriter


@pytest.fixture
async def parts(
    redis: aioredis.Redis, settings: Settings
) -> AsyncIterator[tuple[Store, Bus, ChatProcessor]]:
    async with (
        Store.open(settings.database_url) as store,
        command_connection(redis, cluster=False) as commands,
    ):
        bus = Bus(redis, settings, commands)
        keys = Keys(settings.namespace)
        directory = SessionDirectory(redis, store, keys, commands)
        writer = BatchWriter(store)
        owed = OwedReplies(redis, keys, commands)
        async with ReplyRunner(
            EchoAssistant(), store=store, bus=bus, writer=writer, owed=owed, settings=settings
        ) as replies:
            yield store, bus, ChatProcessor(store, bus, directory, replies, writer)


async def _logged(bus: Bus, user: str) -> list[tuple[int, str]]:
    frames = [orjson.loads(f) for f in await bus.log_after(user, 0)]
    return [(f["seq"], f["type"]) for f in frames if f["type"] == "message"]


async def test_stored_but_not_answered_gets_one_reply(
    parts: tuple[Store, Bus, ChatProcessor],
) -> None:
    store, bus, processor = parts
    session = await store.create_session(
        owner="ann", participants=[], agent="ai", ttl=60, metadata={}
    )
    entry = ChatEntry(session.id, "c1", "ann", "phone", "hello", None, 0)
    # The worker died right after the commit: stored, nothing delivered, no reply.
    assert (await processor.writer.chat(entry)) is not None
    await processor.handle(entry)  # processed again by the next owner
    await processor.replies.idle()
    await processor.handle(entry)  # and again (died before its XACK this time)
    await processor.replies.idle()
    rows = await store.messages(session.id, before=None, limit=10)
    assert sorted(m.role for m in rows) == ["assistant", "user"], "one row each"
    assert [m.content for m in rows if m.role == "assistant"] == ["You said: hello"]
    assert await _logged(bus, "ann") == [(1, "message"), (2, "message")], (
        "the message and its reply, each under one seq"
    )


async def test_answered_then_processed_again_repeats_nothing(
    parts: tuple[Store, Bus, ChatProcessor],
) -> None:
    store, bus, processor = parts
    session = await store.create_session(
        owner="bo", participants=["cy"], agent="ai", ttl=60, metadata={}
    )
    entry = ChatEntry(session.id, "c1", "bo", "phone", "hi there", None, 0)
    await processor.handle(entry)
    await processor.replies.idle()
    before = {u: await _logged(bus, u) for u in ("bo", "cy")}
    await processor.handle(entry)  # the entry was not acknowledged: it comes again
    await processor.replies.idle()
    assert {u: await _logged(bus, u) for u in ("bo", "cy")} == before
    # The message and its reply (seq 2 is the `session` frame of pending -> running).
    assert before["cy"] == [(1, "message"), (3, "message")]
    assert len(await store.messages(session.id, before=None, limit=10)) == 2
