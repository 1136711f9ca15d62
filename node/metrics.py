"""Prometheus metrics of a node (SPEC §7), in a registry of the app's own.

Low-rate events (connections, refusals, closes) use prometheus-client's own
metrics. The per-delivery ones are plain integers and a lock-free histogram,
exported at scrape time: a node writes them from its one event-loop thread, and a
delivery must not pay for a lock per socket write.
"""

from __future__ import annotations

import asyncio
import time
from bisect import bisect_left
from collections.abc import Iterable, Sequence

import redis.asyncio as aioredis
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from common.protocol import Auth, Chat, ClientFrame, Ping, Read, Typing
from common.transport.keys import Keys
from common.transport.queues import queue_depths

# Real-time buckets: 100 µs to 10 s (SPEC §7).
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

_FRAME_TYPES: dict[type, str] = {
    Chat: "chat",
    Typing: "typing",
    Read: "read",
    Ping: "ping",
    Auth: "auth",
}

# A scrape storm (several Prometheus replicas, a dashboard) reads Redis at most this often.
QUEUE_DEPTH_MAX_AGE = 1.0
# A scrape is not held up for long by a slow Redis: past this it shows the last depth.
QUEUE_DEPTH_TIMEOUT = 2.0


def frame_kind(frame: ClientFrame) -> str:
    """The `type` label of a parsed client frame."""
    return _FRAME_TYPES.get(type(frame), "other")


class LatencyHistogram:
    """A histogram without locks, for one thread (per-bucket counts, +Inf last)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        """Count one observation (the bucket whose bound is the first >= it)."""
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        """The histogram in Prometheus form (cumulative buckets)."""
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=self.sum)


class NodeMetrics:
    """Every metric a node exports, and the counts its stats writer reads."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.connections_active = Gauge(
            "websocket_connections_active", "Open WebSocket connections", registry=r
        )
        self.connections_total = Counter(
            "websocket_connections_total", "WebSocket connections accepted", registry=r
        )
        self.refused_total = Counter(
            "websocket_refused_total",
            "Upgrades refused before the handshake",
            ["status"],
            registry=r,
        )
        self.slow_consumer_closes = Counter(
            "fanout_slow_consumer_closes_total",
            "Connections closed 1013 for not reading",
            registry=r,
        )
        self.dropped = Counter(
            "fanout_dropped_frames_total",
            "Frames discarded at a connection's send-queue bound (it was closed 1013)",
            registry=r,
        )
        self.unsent = Counter(
            "fanout_unsent_frames_total",
            "Frames not written because their connection was closing anyway (not a fault)",
            registry=r,
        )
        self.users_active = Gauge("fanout_users_active", "Users with a connection here", registry=r)
        self.redis_roundtrip = Gauge(
            "fanout_redis_roundtrip_seconds", "Latest PING round trip to Redis", registry=r
        )
        self.loop_lag = Gauge(
            "fanout_event_loop_lag_seconds",
            "Worst event-loop lag over the last stats interval",
            registry=r,
        )
        self.draining = Gauge("fanout_draining", "1 while the process drains", registry=r)
        self.queue_depth = Gauge(
            "fanout_queue_depth",
            "Entries not yet acknowledged, per conversation partition (cluster-wide)",
            ["partition"],
            registry=r,
        )
        self._queue_read_at = 0.0
        # Hot-path counts (see the module docstring).
        # Publish (Redis' clock) -> hand-over to the sockets, per logged delivery.
        self.delivery_latency = LatencyHistogram(LATENCY_BUCKETS)
        # Time frames waited in a connection's send queue before the socket took them.
        self.send_wait = LatencyHistogram(LATENCY_BUCKETS)
        self.frames_in: dict[str, int] = {}
        self.frames_delivered = 0
        self.frames_broadcast = 0
        self.deliveries = 0
        r.register(_HotMetrics(self))

    def delivered(self, sockets: int) -> None:
        """Hub callback: one published frame went to `sockets` local connections."""
        self.deliveries += 1
        self.frames_delivered += sockets

    def received(self, kind: str) -> None:
        """One client frame, by type (`invalid`, `rate_limited` for those not handled)."""
        self.frames_in[kind] = self.frames_in.get(kind, 0) + 1

    @property
    def frames_out(self) -> int:
        """Frames written to sockets from Redis and by broadcasts."""
        return self.frames_delivered + self.frames_broadcast

    async def refresh_queue_depth(self, redis: aioredis.Redis, keys: Keys, partitions: int) -> None:
        """Read the cluster's queue depth into `fanout_queue_depth` unless read just now."""
        now = time.monotonic()
        if now - self._queue_read_at < QUEUE_DEPTH_MAX_AGE:
            return
        self._queue_read_at = now
        async with asyncio.timeout(QUEUE_DEPTH_TIMEOUT):
            self.set_queue_depth(await queue_depths(redis, keys, partitions))

    def set_queue_depth(self, depths: dict[int, int]) -> None:
        """Export a queue depth read elsewhere (the stats writer, /admin/stats)."""
        for partition, depth in depths.items():
            self.queue_depth.labels(str(partition)).set(depth)


class _HotMetrics(Collector):
    """Exports NodeMetrics' plain counters and histogram at scrape time."""

    def __init__(self, metrics: NodeMetrics) -> None:
        self._m = metrics

    def collect(self) -> Iterable[Metric]:
        """The families, built from the current counts."""
        m = self._m
        frames = CounterMetricFamily(
            "websocket_messages", "WebSocket frames", labels=["direction", "type"]
        )
        for kind, count in sorted(m.frames_in.items()):
            frames.add_metric(["in", kind], count)
        frames.add_metric(["out", "delivery"], m.frames_delivered)
        frames.add_metric(["out", "broadcast"], m.frames_broadcast)
        yield frames
        yield CounterMetricFamily(
            "fanout_deliveries",
            "Published frames delivered to users held by this node",
            value=m.deliveries,
        )
        yield m.delivery_latency.family(
            "fanout_delivery_latency_seconds",
            "From a delivery's publication (Redis TIME) to its write to the sockets",
        )
        yield m.send_wait.family(
            "fanout_send_wait_seconds",
            "Time frames waited in a connection's send queue for a slow socket",
        )
