"""The idempotent, concurrency-safe migration runner (`fanout migrate`); the migrations
themselves are common/store/migrations/."""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from common.store.migrations import MIGRATIONS

log = logging.getLogger("fanout.migrate")

# Any constant works; it only has to be the same in every process that migrates.
_MIGRATION_LOCK = 0x66616E6F  # "fano"


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


def database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/") or "postgres"


async def create_database(url: str) -> bool:
    """Create the URL's database if it is missing; True if this call created it."""
    name = database_name(url)
    try:
        conn = await asyncpg.connect(url, timeout=10)
    except asyncpg.InvalidCatalogNameError:
        pass
    else:
        await conn.close()
        return False
    admin = await asyncpg.connect(_with_database(url, "postgres"), timeout=10)
    try:
        quoted = '"' + name.replace('"', '""') + '"'
        await admin.execute(f"CREATE DATABASE {quoted}")
    except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
        return False  # another process won the race: fine
    finally:
        await admin.close()
    log.info("created database %s", name)
    return True


async def migrate(url: str) -> list[int]:
    """Create the database if needed and apply missing migrations; the versions applied."""
    await create_database(url)
    conn = await asyncpg.connect(url, timeout=10)
    applied: list[int] = []
    try:
        # Session-level advisory lock: concurrent `fanout migrate` runs queue here.
        await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, sql in MIGRATIONS:
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
            applied.append(version)
            log.info("applied migration %d", version)
    finally:
        try:
            await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
        finally:
            await conn.close()
    return applied


async def missing_migrations(conn: asyncpg.Connection) -> list[int]:
    """The migrations this database lacks: a process started on an old schema stops at once
    (the worker's batch function is in migration 3) instead of failing every entry."""
    if await conn.fetchval("SELECT to_regclass('schema_migrations')") is None:
        return [version for version, _ in MIGRATIONS]
    done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
    return [version for version, _ in MIGRATIONS if version not in done]


def migrate_sync(url: str) -> list[int]:
    return asyncio.run(migrate(url))
