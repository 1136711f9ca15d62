"""Property test: random histories of changes, applied to the real Postgres and Redis, agree
with a model of SPEC §5 — the status, the version, and the `session` frames in the log."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.config import Settings
from common.store.lifecycle import SETTABLE, Refused
from common.store.postgres import Store
from common.store.sessions import SessionChanges, SessionDirectory
from common.transport.bus import Bus, connect_redis
from common.transport.entries import ChatEntry
from common.transport.keys import Keys
from worker.writer import BatchWriter

OPEN = {"pending", "running", "paused"}


@dataclass
class Model:
    """SPEC §5 as plainly as it can be written."""

    status: str = "pending"
    agent: str = "ai"
    version: int = 1
    participants: list[str] = field(default_factory=list)

    def patch(self, target: str) -> bool:
        legal = self.status in OPEN and (
            (target == "running" and self.status in ("pending", "paused"))
            or (target == "paused" and self.status == "running")
            or target in ("completed", "cancelled", "failed")
        )
        if legal:
            self.status, self.version = target, self.version + 1
        return legal

    def message(self) -> None:
        if self.status == "pending":
            self.status, self.version = "running", self.version + 1

    def expire(self) -> None:
        if self.status in OPEN:
            self.status, self.version = "expired", self.version + 1

    def set_agent(self, agent: str) -> bool:
        if self.status not in OPEN:
            return False
        self.agent, self.version = agent, self.version + 1
        return True

    def join(self, user: str) -> bool | None:
        """True: joined; None: already there (no change); False: refused."""
        if self.status not in OPEN:
            return False
        if user in self.participants:
            return None
        self.participants.append(user)
        self.version += 1
        return True


@dataclass(frozen=True)
class System:
    store: Store
    changes: SessionChanges
    bus: Bus
    directory: SessionDirectory


@pytest.fixture
async def system(settings: Settings) -> AsyncIterator[System]:
    redis = await connect_redis(settings)
    try:
        async with Store.open(settings.database_url, max_size=4) as store:
            bus = Bus(redis, settings)
            directory = SessionDirectory(redis, store, Keys(settings.namespace))
            yield System(store, SessionChanges(store, bus, directory), bus, directory)
    finally:
        await redis.aclose()


async def _message(system: System, session_id: str, owner: str, n: int) -> None:
    """What the worker does with a chat: store it (recording activity), announce."""
    entry = ChatEntry(session_id, f"m{n}", owner, "d", "hi", None, 0)
    assert await BatchWriter(system.store).chat(entry) is not None
    await system.changes.announce_soon(session_id)


async def _expire(system: System, session_id: str) -> None:
    async with system.store.pool.acquire() as conn:
        await conn.execute(
            "UPDATE sessions SET expires_at = now() - interval '1 second' WHERE id = $1",
            uuid.UUID(session_id),
        )
    await system.changes.expire_overdue(100)


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("patch"), st.sampled_from(sorted(SETTABLE))),
        st.tuples(st.just("message"), st.none()),
        st.tuples(st.just("expire"), st.none()),
        st.tuples(st.just("agent"), st.sampled_from(["ai", "human"])),
        st.tuples(st.just("join"), st.sampled_from(["ann", "bob"])),
    ),
    max_size=12,
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(ops=OPS)
async def test_postgres_and_the_frames_follow_the_model(
    system: System, ops: list[tuple[str, str | None]]
) -> None:
    owner = f"owner-{uuid.uuid4().hex[:8]}"
    record = await system.store.create_session(
        owner=owner, participants=[], agent="ai", ttl=3600, metadata={}
    )
    sid, model = record.id, Model(participants=[owner])
    for n, (op, arg) in enumerate(ops):
        if op == "message":
            if model.status in OPEN:  # the node refuses chats to closed sessions
                model.message()
                await _message(system, sid, owner, n)
        elif op == "expire":
            model.expire()
            await _expire(system, sid)
        else:
            assert arg is not None
            expected: bool | None
            try:
                if op == "patch":
                    expected = model.patch(arg)
                    got = await system.changes.update(sid, status=arg)
                elif op == "agent":
                    expected = model.set_agent(arg)
                    got = await system.changes.update(sid, agent=arg)
                else:
                    expected = model.join(arg)
                    got = await system.changes.add_participant(
                        sid, arg, role="user", cap=Settings().max_participants
                    )
                assert got is not None
                assert expected is not False, f"{op} {arg} was allowed; the model refuses it"
            except Refused:
                assert expected is False, f"{op} {arg} was refused; the model allows it"

        now = await system.store.get_session(sid)
        assert now is not None
        assert (now.status, now.agent, now.version) == (model.status, model.agent, model.version)
        assert list(now.participants) == model.participants

    async with system.store.pool.acquire() as conn:
        announced = await conn.fetchval(
            "SELECT announced_version FROM sessions WHERE id = $1", uuid.UUID(sid)
        )
    assert announced == model.version, "every change was announced"
    # The newest `session` frame the owner's devices got says what Postgres says.
    frames = [orjson.loads(f) for f in await system.bus.log_after(owner, 0)]
    mine = [f for f in frames if f["type"] == "session" and f["session_id"] == sid]
    if model.version > 1:
        assert (mine[-1]["status"], mine[-1]["agent"]) == (model.status, model.agent)
    else:
        assert mine == []


async def test_the_cache_never_goes_back_to_an_older_version(system: System) -> None:
    record = await system.store.create_session(
        owner="cora", participants=[], agent="ai", ttl=60, metadata={}
    )
    newer = await system.changes.update(record.id, status="running")
    assert newer is not None and newer.version == 2
    directory = system.directory
    # A reader that fetched version 1 before the change writes it back late: ignored.
    await directory.remember(record)
    access = await directory.lookup(record.id)
    assert access is not None and access.status == "running"
    assert await system.changes.delete(record.id)
    await directory.remember(newer)  # a late writer cannot bring a deleted session back
    assert await directory.lookup(record.id) is None
