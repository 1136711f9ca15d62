"""The test run's Redis is its own: a redis-server child of this run, never 127.0.0.1:6379."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

import redis.asyncio as aioredis

from common.localcluster.embedded import Services


def _parent_of(pid: int) -> int:
    # /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces, so split after ')'.
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


async def test_the_run_uses_a_redis_server_it_started(
    services: Services, redis: aioredis.Redis, env: dict[str, str]
) -> None:
    assert urlsplit(services.redis_url).port != 6379
    assert env["FANOUT_REDIS_URL"] == services.redis_url
    info = await redis.info("server")
    assert _parent_of(int(info["process_id"])) == os.getpid()
