"""Group commit against the real Postgres: many chats, one transaction, the same rules."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from common.store.batch import TOUCH_SLACK, ChatWritten, ReplyWrite, write_batch
from common.store.postgres import MessageRecord, Store
from common.transport.entries import ChatEntry
from worker.writer import BatchWriter


def chat(session_id: str, n: int, content: str = "hello") -> ChatEntry:
    return ChatEntry(
        session_id=session_id,
        client_msg_id=f"c{n}",
        user_id="ann",
        device_id="phone",
        content=content,
        metadata=None,
        accepted_ms=0,
    )


async def new_session(store: Store, agent: str = "ai") -> str:
    made = await store.create_session(
        owner="ann", participants=[], agent=agent, ttl=60, metadata={}
    )
    return made.id


async def test_chats_ready_together_share_one_transaction(database_url: str) -> None:
    async with Store.open(database_url) as store:
        sessions = [await new_session(store) for _ in range(20)]
        writer = BatchWriter(store)
        written = await asyncio.gather(*(writer.chat(chat(s, 1)) for s in sessions))
        assert writer.batches == 1
        ids = []
        for session_id, w in zip(sessions, written, strict=True):
            assert w is not None and w.created
            assert w.message.session_id == session_id and w.role == "user"
            # The first message starts the session, and it takes an assistant reply.
            assert (w.before.status, w.session.status) == ("pending", "running")
            assert w.session.version == w.before.version + 1
            assert w.reply_id is not None and w.reply_id > w.message.id
            ids += [w.message.id, w.reply_id]
        assert ids == sorted(ids), "ids in entry order, each reply right after its message"
        stored = await store.messages(sessions[0], before=None, limit=10)
        assert [m.content for m in stored] == ["hello"]


async def test_a_retry_gets_the_first_row_and_no_second_reply(database_url: str) -> None:
    async with Store.open(database_url) as store:
        session_id = await new_session(store)
        writer = BatchWriter(store)
        first = await writer.chat(chat(session_id, 1))
        again = await writer.chat(chat(session_id, 1, content="changed on retry"))
        assert first is not None and again is not None
        assert (first.created, again.created) == (True, False)
        assert again.message == first.message
        assert again.reply_id is None and again.session.status == "running"
        assert first.reply_id is not None
        reply = await writer.reply(
            ReplyWrite(session_id, first.reply_id, f"reply:{first.message.id}", "assistant", "hi")
        )
        assert reply.id == first.reply_id and reply.role == "assistant"
        assert (
            await writer.reply(
                ReplyWrite(
                    session_id, first.reply_id + 99, f"reply:{first.message.id}", "assistant", "x"
                )
            )
            == reply
        ), "a reply stored twice keeps its first row"
        history = await store.messages(session_id, before=None, limit=10)
        assert [m.content for m in history] == ["hi", "hello"]


async def test_no_reply_for_a_human_session_and_none_for_a_gone_one(database_url: str) -> None:
    async with Store.open(database_url) as store:
        human = await new_session(store, agent="human")
        writer = BatchWriter(store)
        w, gone = await asyncio.gather(
            writer.chat(chat(human, 1)), writer.chat(chat(str(uuid.uuid4()), 1))
        )
        assert w is not None and w.created and w.reply_id is None
        assert gone is None


async def test_one_bad_chat_fails_alone(database_url: str) -> None:
    async with Store.open(database_url) as store:
        sessions = [await new_session(store) for _ in range(3)]
        writer = BatchWriter(store)
        # Postgres text cannot hold NUL: this entry fails, its neighbours must not.
        results = await asyncio.gather(
            writer.chat(chat(sessions[0], 1)),
            writer.chat(chat(sessions[1], 1, content="bad \x00 byte")),
            writer.chat(chat(sessions[2], 1)),
            return_exceptions=True,
        )
        assert isinstance(results[1], Exception)
        for ok in (results[0], results[2]):
            assert not isinstance(ok, BaseException) and ok is not None and ok.created
        assert await store.messages(sessions[1], before=None, limit=10) == []
        assert len(await store.messages(sessions[2], before=None, limit=10)) == 1


async def test_upper_case_session_ids_are_the_same_session(database_url: str) -> None:
    async with Store.open(database_url) as store:
        session_id = await new_session(store)
        # Canonical once the entry is read off its stream, whatever the producer wrote.
        entry = ChatEntry.decode(chat(session_id.upper(), 1).encode())
        written = await BatchWriter(store).chat(entry)
        assert written is not None and written.message.session_id == session_id


@pytest.mark.parametrize("size", [1, 129])
async def test_batches_are_bounded(database_url: str, size: int) -> None:
    async with Store.open(database_url) as store:
        session_id = await new_session(store, agent="human")
        writer = BatchWriter(store, max_batch=128, max_flushes=1)
        written = await asyncio.gather(*(writer.chat(chat(session_id, n)) for n in range(size)))
        assert all(w is not None and w.created for w in written)
        assert writer.batches == (size + 127) // 128
        ids = [w.message.id for w in written if w is not None]
        assert ids == sorted(ids)


async def test_a_paused_session_stores_extends_and_takes_no_reply(database_url: str) -> None:
    async with Store.open(database_url) as store:
        session_id = await new_session(store)
        writer = BatchWriter(store)
        first = await writer.chat(chat(session_id, 1))
        assert first is not None and first.session.status == "running"
        await store.execute(
            "UPDATE sessions SET status = 'paused', expires_at = now() WHERE id = $1",
            uuid.UUID(session_id),
        )
        paused = await writer.chat(chat(session_id, 2))
        assert paused is not None and paused.created and paused.reply_id is None
        assert (paused.before.status, paused.session.status) == ("paused", "paused")
        assert paused.session.version == paused.before.version, "no status change"
        assert paused.session.expires_at > paused.before.expires_at, "activity extends the TTL"


async def expiry_and_row_version(store: Store, session_id: str) -> tuple[float, int]:
    """Seconds from now to the session's expiry, and its row version (xmin)."""
    row = await store.fetchrow(
        "SELECT extract(epoch FROM expires_at - now())::float8 AS left_s, xmin::text::bigint"
        " AS xmin FROM sessions WHERE id = $1",
        uuid.UUID(session_id),
    )
    assert row is not None
    return row["left_s"], row["xmin"]


@pytest.mark.parametrize("behind", [TOUCH_SLACK / 2, TOUCH_SLACK * 2])
async def test_activity_rewrites_a_session_only_when_its_expiry_lags_past_the_slack(
    database_url: str, behind: float
) -> None:
    # ttl 60: the slack is 1% of it (0.6 s) when that is below TOUCH_SLACK.
    slack = min(TOUCH_SLACK, 60 / 100)
    async with Store.open(database_url) as store:
        session_id = await new_session(store)
        writer = BatchWriter(store)
        first = await writer.chat(chat(session_id, 1))
        assert first is not None and first.session.status == "running"
        lag = behind / TOUCH_SLACK * slack  # half the slack, or twice it
        await store.execute(
            "UPDATE sessions SET expires_at = now() + (ttl - $2::float8) * interval '1 second'"
            " WHERE id = $1",
            uuid.UUID(session_id),
            lag,
        )
        _, before = await expiry_and_row_version(store, session_id)
        second = await writer.chat(chat(session_id, 2))
        assert second is not None and second.created and second.reply_id is not None
        left, after = await expiry_and_row_version(store, session_id)
        if lag < slack:
            assert after == before, "an expiry within the slack: the row is not rewritten"
            assert second.session == second.before
            assert 60 - slack <= left < 60
        else:
            assert after != before, "past the slack: the TTL starts again"
            assert second.session.expires_at > second.before.expires_at
            assert left > 60 - slack
            assert second.session.last_activity_at > second.before.last_activity_at


async def test_requests_made_during_a_flush_share_the_next_one(database_url: str) -> None:
    # One transaction in flight per worker (MAX_FLUSHES): Postgres' CPU is mostly per
    # transaction, so requests that arrive while one runs wait and go together.
    release = asyncio.Event()
    started = asyncio.Event()

    async def held_write(
        conn: asyncpg.Connection, chats: list[ChatEntry], replies: list[ReplyWrite]
    ) -> tuple[list[ChatWritten | None], list[MessageRecord]]:
        started.set()
        await release.wait()
        return await write_batch(conn, chats, replies)

    async with Store.open(database_url) as store:
        sessions = [await new_session(store) for _ in range(6)]
        writer = BatchWriter(store, write=held_write)
        first = asyncio.create_task(writer.chat(chat(sessions[0], 1)))
        await started.wait()
        later = []
        for s in sessions[1:]:  # one per loop turn, each while the first flush runs
            later.append(asyncio.create_task(writer.chat(chat(s, 1))))
            await asyncio.sleep(0.01)
        release.set()
        written = await asyncio.gather(first, *later)
    assert all(w is not None and w.created for w in written)
    assert writer.batches == 2, "the five made during the first flush went in one more"
