"""Is Redis / Postgres answering? One try each, for start-up checks of nodes and workers."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from common.config import Settings
from common.errors import SERVICE_DOWN
from common.transport.bus import connect_redis

PROBE_TIMEOUT = 3.0

# {"redis": "ok" | "down: <why>", "postgres": ...}
Checks = dict[str, str]
# What a probe may meet from a service that is not (yet) usable: refused, timed out,
# starting up, or refusing us (e.g. the database does not exist yet).
DOWN: tuple[type[Exception], ...] = (*SERVICE_DOWN, asyncpg.PostgresError)


async def check_services(settings: Settings) -> Checks:
    """{"redis": "ok" | "down: ...", "postgres": ...}, each tried once within PROBE_TIMEOUT."""
    redis_result, postgres_result = await asyncio.gather(
        _probe(_ping_redis(settings)),
        _probe(_ping_postgres(settings.database_url)),
    )
    return {"redis": redis_result, "postgres": postgres_result}


async def _probe(check: Coroutine[Any, Any, None]) -> str:
    try:
        await asyncio.wait_for(check, PROBE_TIMEOUT)
    except DOWN as exc:
        return f"down: {_reason(exc)}"
    return "ok"


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def _ping_redis(settings: Settings) -> None:
    redis = await connect_redis(settings)
    try:
        await redis.ping()
    finally:
        await redis.aclose()


async def _ping_postgres(url: str) -> None:
    conn = await asyncpg.connect(url, timeout=PROBE_TIMEOUT)
    await conn.close()


def all_ok(checks: Checks) -> bool:
    return all(value == "ok" for value in checks.values())


def where(url: str) -> str:
    """host:port of a service URL (never its password), for messages."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname or parts.path)
