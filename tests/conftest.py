"""Fixtures: a redis-server of this test run's own (never the machine's 6379), Postgres
(the default one when it answers, else an embedded one), a database and a Redis
namespace of its own for every test; and, for the tests that ask for one, a Redis Cluster
of their own (tests/support/redis_cluster.py)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from common.config import Settings
from common.localcluster.embedded import Services, embedded_redis, local_services
from common.store.schema import migrate
from tests.support.harness import ROOT, SECRET, Cluster, free_port
from tests.support.redis_cluster import cluster_ports, redis_cluster  # noqa: F401 (fixtures)

DEFAULT_POSTGRES = "postgresql://127.0.0.1:5432/postgres"


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    """This run's own Redis, and Postgres (shared or embedded; every test has its own database)."""
    # A redis-server of our own on a free port: the tests flush scripts and fill
    # keyspaces, which must never reach a developer's Redis.
    redis_url = f"redis://127.0.0.1:{free_port()}/0"
    # A stable folder: an embedded Postgres is initialised once and reused across runs.
    data = ROOT / ".fanout-data" / "tests"
    data.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        stack.enter_context(embedded_redis(tmp_path_factory.mktemp("redis"), redis_url))
        found = stack.enter_context(
            local_services(data, redis_url=redis_url, database_url=DEFAULT_POSTGRES)
        )
        yield found


def _db_url(base: str, name: str) -> str:
    return base.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(scope="session")
def template_db(services: Services) -> Iterator[str]:
    """A migrated database that every test's database is cloned from (fast)."""
    name = f"fanout_tpl_{uuid.uuid4().hex[:8]}"
    asyncio.run(migrate(_db_url(services.database_url, name)))
    yield name
    asyncio.run(_drop(services.database_url, name))


async def _drop(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(_db_url(admin_url, "postgres"))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
async def database_url(services: Services, template_db: str) -> AsyncIterator[str]:
    name = f"fanout_t_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(_db_url(services.database_url, "postgres"))
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    finally:
        await admin.close()
    yield _db_url(services.database_url, name)
    await _drop(services.database_url, name)


@pytest.fixture
async def namespace(services: Services) -> AsyncIterator[str]:
    """A Redis key prefix of this test's own; its keys are deleted afterwards."""
    ns = f"t{uuid.uuid4().hex[:10]}:"
    yield ns
    client = aioredis.Redis.from_url(services.redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=f"{ns}*", count=1000)]
        for start in range(0, len(keys), 500):
            await client.delete(*keys[start : start + 500])
    finally:
        await client.aclose()


@pytest.fixture
def env(services: Services, database_url: str, namespace: str) -> dict[str, str]:
    """Environment of this test's fanout processes."""
    return {
        "FANOUT_REDIS_URL": services.redis_url,
        "FANOUT_DATABASE_URL": database_url,
        "FANOUT_NAMESPACE": namespace,
        "FANOUT_JWT_SECRET": SECRET,
        "FANOUT_PARTITIONS": "4",
        "FANOUT_LEASE_TTL": "2",
        "FANOUT_CLAIM_IDLE": "2",
        "FANOUT_DRAIN_TIMEOUT": "5",
        "FANOUT_HEARTBEAT": "5",
        "FANOUT_WORKER_CONCURRENCY": "8",
        "FANOUT_DB_POOL_SIZE": "4",
    }


@pytest.fixture
def settings(env: dict[str, str]) -> Settings:
    return Settings.from_env(env)


@pytest.fixture
def cluster(env: dict[str, str], tmp_path: Path) -> Iterator[Cluster]:
    made = Cluster(env, tmp_path)
    try:
        yield made
    finally:
        made.stop_all()


@pytest.fixture
async def redis(services: Services) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(services.redis_url)
    yield client
    await client.aclose()
