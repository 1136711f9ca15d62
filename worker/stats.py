"""A worker's stats writer: partitions owned, processed/s, failures and its queue depth."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Any, Protocol

import redis.asyncio as aioredis

from common.config import Settings
from common.store.postgres import Store
from common.transport.keys import Keys
from common.transport.queues import queue_depths
from common.transport.stats import WORKER, Rates, StatsWriter, stats_writes
from worker.consumer import PartitionConsumer
from worker.leases import PartitionLeases
from worker.processor import ChatProcessor

log = logging.getLogger("fanout.worker")

# Queue depth costs two commands per partition: read at most this often.
QUEUE_DEPTH_MAX_AGE = 1.0


class ConsumerTally:
    """Failures and dead letters of every consumer this worker ran, released ones included."""

    def __init__(self) -> None:
        self._seen: dict[PartitionConsumer, tuple[int, int]] = {}
        self.failures = 0
        self.dead_lettered = 0

    def update(self, consumers: Iterable[PartitionConsumer]) -> None:
        """Add what the consumers counted since the last update."""
        current = set(consumers)
        # A consumer released since the last update is still held here: its last
        # failures are counted before it is let go.
        for consumer in current | self._seen.keys():
            failures, dead = self._seen.get(consumer, (0, 0))
            self.failures += consumer.failures - failures
            self.dead_lettered += consumer.dead_lettered - dead
        self._seen = {c: (c.failures, c.dead_lettered) for c in current}


class WorkerView(Protocol):
    """What the stats writer and the health server read of a running worker."""

    settings: Settings
    started_at: float
    store: Store
    leases: PartitionLeases
    processor: ChatProcessor
    consumers: dict[int, tuple[PartitionConsumer, asyncio.Task[None]]]
    healthy: bool
    draining: bool

    @property
    def redis(self) -> aioredis.Redis: ...


class WorkerStats(StatsWriter):
    """The worker's stats: partitions, processed/s, failures, queue depth."""

    def __init__(self, worker: WorkerView, redis: aioredis.Redis) -> None:
        settings = worker.settings
        super().__init__(
            WORKER,
            settings.node_id,
            settings.stats_interval,
            worker.started_at,
            redis,
            Keys(settings.namespace),
        )
        self._worker = worker
        self._rates = Rates()
        self.tally = ConsumerTally()
        self.depths: dict[int, int] = {}
        self._depths_at = 0.0
        self.latest: dict[str, Any] = {}

    async def refresh_queue_depth(self) -> dict[int, int]:
        """The cluster's queue depth per partition, read from Redis unless read just now."""
        now = time.monotonic()
        if now - self._depths_at >= QUEUE_DEPTH_MAX_AGE:
            self._depths_at = now
            self.depths = await queue_depths(
                self._redis, self._keys, self._worker.settings.partitions
            )
        return self.depths

    async def tick(self) -> None:
        """One stats write."""
        worker = self._worker
        settings = worker.settings
        common = await self._sampler.sample(self._redis)
        depths = await self.refresh_queue_depth()
        owned = sorted(worker.leases.owned)
        self.tally.update(consumer for consumer, _ in worker.consumers.values())
        processed = worker.processor.processed
        rates = self._rates.per_second(
            {"processed": float(processed), "failures": float(self.tally.failures)}
        )
        record = {
            **common,
            "draining": worker.draining,
            "healthy": worker.healthy,
            "partitions": owned,
            "partitions_owned": len(owned),
            "processed_total": processed,
            "processed_per_s": rates["processed"],
            "failures_total": self.tally.failures,
            "failures_per_s": rates["failures"],
            "dead_lettered_total": self.tally.dead_lettered,
            "queue_depth": sum(depths.get(p, 0) for p in owned),
            "queue": {str(p): depths.get(p, 0) for p in owned},
            "concurrency": settings.worker_concurrency,
            # Group commit at work: messages written per Postgres transaction.
            "db_transactions_total": worker.processor.writer.batches,
            "db_writes_total": worker.processor.writer.written,
        }
        self.latest = record
        async with self._redis.pipeline(transaction=False) as pipe:
            index_ttl = max(settings.lease_ttl * 3, 60)
            stats_writes(pipe, self._keys, record, settings.lease_ttl, index_ttl)
            await pipe.execute()
