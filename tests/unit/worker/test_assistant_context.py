"""RecentTurns: a reply's context from memory only when memory provably holds it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from common.store.postgres import MessageRecord
from common.store.replies import Turn
from common.transport.keys import partition_of
from worker.assistant.context import SLACK, RecentTurns

SESSION = "7d1c6a52-0000-4000-8000-000000000001"


def message(mid: int, role: str = "user", content: str | None = None) -> MessageRecord:
    return MessageRecord(
        mid, SESSION, f"c{mid}", role, "ann", None, content or f"m{mid}", None, datetime.now(UTC)
    )


class Postgres:
    """What the store holds, and how often it was asked."""

    def __init__(self, ids: list[int]) -> None:
        self.rows = {i: Turn("user", f"m{i}") for i in ids}
        self.seeds = 0
        self.queries = 0
        self.gate: asyncio.Event | None = None

    async def seed(self, session_id: str, limit: int) -> list[tuple[int, Turn]]:
        self.seeds += 1
        snapshot = sorted(self.rows.items())[-limit:]
        if self.gate is not None:
            await self.gate.wait()
        return snapshot

    async def query(self, session_id: str, before: int, limit: int) -> list[Turn]:
        self.queries += 1
        return [t for i, t in sorted(self.rows.items()) if i < before][-limit:]

    def store(self, turns: RecentTurns, record: MessageRecord) -> None:
        self.rows[record.id] = Turn("user", record.content)
        turns.seen(record)


def contents(turns: list[Turn]) -> list[str]:
    return [t.content for t in turns]


async def test_seeded_once_then_answered_from_memory() -> None:
    pg = Postgres([1, 2, 3])
    turns = RecentTurns(pg.seed, pg.query, size=2, partitions=4)
    assert contents(await turns.before(SESSION, 4, 2)) == ["m2", "m3"]
    pg.store(turns, message(4))
    pg.store(turns, message(5))
    assert contents(await turns.before(SESSION, 6, 2)) == ["m4", "m5"]
    assert contents(await turns.before(SESSION, 5, 10)) == ["m1", "m2", "m3", "m4"]
    assert (pg.seeds, pg.queries) == (1, 0)


async def test_a_message_stored_while_seeding_is_not_missed() -> None:
    pg = Postgres([1, 2])
    pg.gate = asyncio.Event()
    turns = RecentTurns(pg.seed, pg.query, size=5, partitions=4)
    seeding = asyncio.create_task(turns.before(SESSION, 3, 5))
    await asyncio.sleep(0)  # the seed's snapshot is taken: [1, 2]
    pg.store(turns, message(3))  # committed after the snapshot
    pg.gate.set()
    assert contents(await seeding) == ["m1", "m2"]
    assert contents(await turns.before(SESSION, 4, 5)) == ["m1", "m2", "m3"]
    assert pg.queries == 0


async def test_what_was_trimmed_is_read_from_postgres() -> None:
    pg = Postgres([1])
    turns = RecentTurns(pg.seed, pg.query, size=2, partitions=4)
    await turns.before(SESSION, 2, 2)
    for mid in range(2, 2 + SLACK + 10):
        pg.store(turns, message(mid))
    assert contents(await turns.before(SESSION, 4, 2)) == ["m2", "m3"], "trimmed: asked"
    assert pg.queries == 1
    newest = 1 + SLACK + 10
    assert contents(await turns.before(SESSION, newest + 1, 2)) == [f"m{newest - 1}", f"m{newest}"]
    assert pg.queries == 1


async def test_a_partition_given_up_is_forgotten_and_system_notes_are_not_context() -> None:
    pg = Postgres([1])
    turns = RecentTurns(pg.seed, pg.query, size=3, partitions=4)
    await turns.before(SESSION, 2, 3)
    turns.seen(message(2, role="system", content="unavailable"))
    assert contents(await turns.before(SESSION, 3, 3)) == ["m1"]
    turns.forget_partition(partition_of(SESSION, 4))
    pg.rows[5] = Turn("assistant", "written by another worker")
    assert contents(await turns.before(SESSION, 6, 3)) == ["m1", "written by another worker"]
    assert pg.seeds == 2
