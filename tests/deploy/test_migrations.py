"""`fanout migrate` against the real Postgres: a fresh database, an upgrade of an old
one, and several processes at once all end with the same schema, batch function included."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from common.localcluster.embedded import Services
from common.store import schema
from common.store.batch import write_batch
from common.store.postgres import Store
from common.transport.entries import ChatEntry
from tests.support.harness import ROOT, Cluster

LATEST = [version for version, _ in schema.MIGRATIONS]


@pytest.fixture
async def fresh_url(services: Services) -> AsyncIterator[str]:
    """The URL of a database that does not exist yet; dropped afterwards."""
    name = f"fanout_m_{uuid.uuid4().hex[:10]}"
    base = services.database_url.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    admin = await asyncpg.connect(f"{base}/postgres")
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def applied_versions(url: str) -> list[int]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT version FROM schema_migrations ORDER BY version")
        return [r["version"] for r in rows]
    finally:
        await conn.close()


async def test_a_fresh_database_gets_every_migration_once(fresh_url: str) -> None:
    assert await schema.migrate(fresh_url) == LATEST
    assert await schema.migrate(fresh_url) == [], "idempotent"
    assert await applied_versions(fresh_url) == LATEST
    conn = await asyncpg.connect(fresh_url)
    try:
        configs = await conn.fetch(
            "SELECT proname, proconfig FROM pg_proc WHERE proname LIKE 'fanout_write_batch_v%'"
        )
    finally:
        await conn.close()
    # Without it Postgres re-plans the function's statements on every call.
    assert {r["proname"]: r["proconfig"] for r in configs} == {
        name: ["plan_cache_mode=force_generic_plan"]
        for name in ("fanout_write_batch_v1", "fanout_write_batch_v2")
    }


async def test_an_old_database_is_upgraded_and_keeps_its_messages(
    fresh_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A database as the release before the batch function left it (migrations 1-2).
    with monkeypatch.context() as old:
        old.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:2])
        assert await schema.migrate(fresh_url) == [1, 2]
    async with Store.open(fresh_url) as store:
        session = await store.create_session(
            owner="ann", participants=[], agent="ai", ttl=60, metadata={}
        )
        await store.execute(
            "INSERT INTO messages (session_id, client_msg_id, role, user_id, content)"
            " VALUES ($1, 'c1', 'user', 'ann', 'stored by the old release')",
            uuid.UUID(session.id),
        )
        await store.execute(
            "UPDATE sessions SET status = 'running' WHERE id = $1", uuid.UUID(session.id)
        )
        assert await schema.migrate(fresh_url) == [v for v, _ in schema.MIGRATIONS[2:]]
        entry = ChatEntry(session.id, "c1", "ann", "phone", "retried after the upgrade", None, 0)
        async with store.acquire() as conn:
            (written,), _ = await write_batch(conn, [entry], [])
    assert written is not None and not written.created and written.reply_id is None
    assert written.message.content == "stored by the old release", "the first row stands"


async def test_several_processes_migrating_at_once_agree(fresh_url: str) -> None:
    script = (
        f"import json, common.store.schema as s; print(json.dumps(s.migrate_sync({fresh_url!r})))"
    )
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, cwd=ROOT, stdout=asyncio.subprocess.PIPE
        )
        for _ in range(4)
    ]
    outputs = [await p.communicate() for p in procs]
    assert [p.returncode for p in procs] == [0] * 4
    applied = sorted(v for out, _ in outputs for v in json.loads(out))
    assert applied == LATEST, "each migration applied by exactly one of them"
    assert await applied_versions(fresh_url) == LATEST


async def test_a_worker_on_an_old_schema_stops_with_one_line(
    fresh_url: str, cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as old:
        old.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:2])
        await schema.migrate(fresh_url)
    worker = await cluster.worker(ready=False, FANOUT_DATABASE_URL=fresh_url)
    code = await asyncio.to_thread(worker.popen.wait, 30)
    assert code == 2
    assert "lacks migration 3, 4, 5: run `fanout migrate` first" in worker.log()
    assert "Traceback" not in worker.log()
