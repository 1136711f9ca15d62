"""The worker's own small HTTP server (`--port`): /healthz, /readyz, /metrics."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from worker.stats import WorkerStats, WorkerView

WORKER: web.AppKey[WorkerView] = web.AppKey("worker")


class WorkerCollector(Collector):
    """A worker's numbers, read at scrape time from the worker and its stats writer."""

    def __init__(self, worker: WorkerView, stats: WorkerStats) -> None:
        self._worker = worker
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        """The families, read from the worker now."""
        worker, stats = self._worker, self._stats
        stats.tally.update(consumer for consumer, _ in worker.consumers.values())
        yield CounterMetricFamily(
            "fanout_worker_processed", "Chat entries processed", value=worker.processor.processed
        )
        replies = worker.processor.replies
        made = CounterMetricFamily(
            "fanout_worker_replies",
            "Assistant replies stored, by outcome (failed: a system error message instead)",
            labels=["outcome"],
        )
        made.add_metric(["complete"], replies.made)
        made.add_metric(["interrupted"], replies.interrupted)
        made.add_metric(["failed"], replies.failed)
        yield made
        yield GaugeMetricFamily(
            "fanout_worker_replies_in_hand",
            "Replies being generated or waiting for their turn or a slot",
            value=replies.in_hand,
        )
        yield CounterMetricFamily(
            "fanout_worker_failures",
            "Entries whose processing failed (each attempt counts)",
            value=stats.tally.failures,
        )
        yield CounterMetricFamily(
            "fanout_worker_dead_letters",
            "Entries moved to a dead-letter stream",
            value=stats.tally.dead_lettered,
        )
        yield GaugeMetricFamily(
            "fanout_worker_partitions_owned",
            "Partitions this worker owns",
            value=len(worker.leases.owned),
        )
        yield GaugeMetricFamily(
            "fanout_draining", "1 while the process drains", value=1 if worker.draining else 0
        )
        latest = stats.latest
        yield GaugeMetricFamily(
            "fanout_redis_roundtrip_seconds",
            "Latest PING round trip to Redis",
            value=latest.get("redis_rtt_ms", 0) / 1000,
        )
        yield GaugeMetricFamily(
            "fanout_event_loop_lag_seconds",
            "Worst event-loop lag over the last stats interval",
            value=latest.get("loop_lag_ms", 0) / 1000,
        )
        depth = GaugeMetricFamily(
            "fanout_queue_depth",
            "Entries not yet acknowledged, per conversation partition (cluster-wide)",
            labels=["partition"],
        )
        for partition, value in sorted(stats.depths.items()):
            depth.add_metric([str(partition)], value)
        yield depth


def health_app(
    worker: WorkerView, stats: WorkerStats, extra: Iterable[Collector] = ()
) -> web.Application:
    """The worker's probe and metrics endpoints; `extra`: more families for /metrics."""
    app = web.Application()
    app[WORKER] = worker
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(WorkerCollector(worker, stats))
    for collector in extra:
        registry.register(collector)

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        checks = {"redis": "ok", "postgres": "ok"}
        results = await asyncio.gather(
            asyncio.wait_for(worker.redis.ping(), 2),
            asyncio.wait_for(worker.store.ping(), 2),
            return_exceptions=True,
        )
        for name, result in zip(("redis", "postgres"), results, strict=True):
            if isinstance(result, BaseException):
                checks[name] = f"down: {type(result).__name__}"
        ready = not worker.draining and all(v == "ok" for v in checks.values())
        status = "draining" if worker.draining else ("ready" if ready else "unavailable")
        return web.json_response({"status": status, **checks}, status=200 if ready else 503)

    async def metrics(request: web.Request) -> web.Response:
        # Fresh queue depth for the scrape (cached for a second against scrape storms);
        # with Redis down the scrape still answers, with the last depth read.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(stats.refresh_queue_depth(), 2)
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
