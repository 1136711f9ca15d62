"""Process stats in Redis (SPEC §7): what every node and worker writes about itself.

Each node and worker writes its latest stats as one JSON string with a TTL of
FANOUT_LEASE_TTL, and its id into a sorted set scored by when that entry expires. A
process that dies stops refreshing both, so it drops out of the view within the TTL;
one that stops cleanly removes itself at once. The cluster view read back from these
records is common/transport/cluster_stats.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, Self

import orjson
import redis.asyncio as aioredis

from common.gcpause import GcPauses
from common.runtime import raise_if_cancelled
from common.transport.keys import Keys

log = logging.getLogger("fanout.stats")

NODE = "node"
WORKER = "worker"
# When this process started (the module is imported during start-up): uptime counts from
# here, not from when the stats writer began, so a record is never "up 0 s" by rounding.
PROCESS_STARTED = time.time()
# Seconds one stats write may take before it is abandoned (and logged).
TICK_TIMEOUT = 5.0
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def now_ms() -> int:
    """Wall-clock milliseconds (the unit of every stats timestamp and expiry)."""
    return int(time.time() * 1000)


def rss_bytes() -> int:
    """Resident memory of this process (Linux /proc; elsewhere the peak, from getrusage)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class LoopLag:
    """Event-loop lag: how late a short sleep wakes up, worst case since the last `take`."""

    PERIOD = 0.05

    def __init__(self) -> None:
        self._worst = 0.0

    async def run(self) -> None:
        """Sample until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(self.PERIOD)
            self._worst = max(self._worst, loop.time() - start - self.PERIOD)

    def take(self) -> float:
        """The worst lag (seconds) since the last call; starts over."""
        worst, self._worst = self._worst, 0.0
        return max(worst, 0.0)


class Rates:
    """Per-second rates of cumulative counters between consecutive samples."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._at = time.monotonic()

    def per_second(self, counts: dict[str, float]) -> dict[str, float]:
        """Each counter's increase per second since the last call (0 on the first)."""
        now = time.monotonic()
        elapsed = max(now - self._at, 1e-6)
        rates = {
            name: round(max(value - self._last.get(name, value), 0) / elapsed, 2)
            for name, value in counts.items()
        }
        self._last, self._at = dict(counts), now
        return rates


class ProcessSampler:
    """The fields every process reports: identity, uptime, memory, loop lag, Redis RTT."""

    def __init__(self, kind: str, process_id: str, interval: float) -> None:
        self.kind = kind
        self.process_id = process_id
        self.interval = interval
        self.started_at = PROCESS_STARTED
        self.lag = LoopLag()
        self.gc = GcPauses()

    async def sample(self, redis: aioredis.Redis) -> dict[str, Any]:
        """The common fields, with a fresh Redis round trip and the loop lag since last time."""
        started = time.perf_counter()
        await redis.ping()
        rtt = time.perf_counter() - started
        return {
            "id": self.process_id,
            "kind": self.kind,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": round(self.started_at, 3),
            "updated_at": now_ms(),
            "uptime_s": round(time.time() - self.started_at, 3),
            "interval_s": self.interval,
            "redis_rtt_ms": round(rtt * 1000, 3),
            "loop_lag_ms": round(self.lag.take() * 1000, 3),
            "gc_pause_ms": self.gc.take(),
            "rss_bytes": rss_bytes(),
        }


class StatsWriter:
    """Owns a process's stats tasks: `async with` starts them, leaving removes its entry.

    Subclasses write their numbers in `tick` (every FANOUT_STATS_INTERVAL) and may let
    go of more in `on_stop`.
    """

    def __init__(
        self,
        kind: str,
        process_id: str,
        interval: float,
        started_at: float,
        redis: aioredis.Redis,
        keys: Keys,
    ) -> None:
        self._kind = kind
        self._process_id = process_id
        self._interval = interval
        self._redis = redis
        self._keys = keys
        self._sampler = ProcessSampler(kind, process_id, interval)
        self._sampler.started_at = started_at
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Self:
        self._sampler.gc.__enter__()
        self._tasks = [
            asyncio.create_task(self._sampler.lag.run(), name="loop-lag"),
            asyncio.create_task(
                report_every(self._interval, self.tick, self._kind), name=f"{self._kind}-stats"
            ),
        ]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._sampler.gc.__exit__()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        try:
            async with asyncio.timeout(2):
                await remove_stats(self._redis, self._keys, self._kind, self._process_id)
                await self.on_stop()
        except Exception as exc:  # the entries expire by themselves within the TTL
            log.warning("stats not removed at stop (%s); they expire within the TTL", exc)

    async def tick(self) -> None:
        """One stats write."""
        raise NotImplementedError

    async def on_stop(self) -> None:
        """Anything else to give up at a clean stop."""


async def report_every(interval: float, tick: Callable[[], Awaitable[None]], what: str) -> None:
    """Run `tick` every `interval` until cancelled; a failure is logged once per outage."""
    failing = False
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        try:
            # A stalled Redis must not stall the writer for good: give up and try again.
            async with asyncio.timeout(max(interval * 5, TICK_TIMEOUT)):
                await tick()
            if failing:
                log.info("%s: writing stats again", what)
            failing = False
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not failing:
                log.warning("%s: stats not written (%s); retrying every %.1fs", what, exc, interval)
            failing = True
        raise_if_cancelled()
        await asyncio.sleep(max(interval - (loop.time() - started), 0.0))


def stats_writes(
    pipe: Any, keys: Keys, record: dict[str, Any], ttl: float, index_ttl: float
) -> None:
    """Queue on a pipeline the commands that publish one process's record."""
    expires = now_ms() + int(ttl * 1000)
    index = keys.stats_index(record["kind"])
    pipe.set(keys.stats(record["kind"], record["id"]), orjson.dumps(record), px=int(ttl * 1000))
    pipe.zadd(index, {record["id"]: expires})
    pipe.zremrangebyscore(index, "-inf", now_ms())
    pipe.pexpire(index, int(index_ttl * 1000))


async def remove_stats(redis: aioredis.Redis, keys: Keys, kind: str, process_id: str) -> None:
    """A clean stop: leave the cluster view at once rather than after the TTL."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.delete(keys.stats(kind, process_id))
        pipe.zrem(keys.stats_index(kind), process_id)
        if kind == NODE:
            pipe.delete(keys.node_connections(process_id))
        await pipe.execute()
