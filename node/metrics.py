"""Prometheus metrics of a node (SPEC §7), in a registry of the app's own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Real-time buckets: sub-millisecond to seconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class NodeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
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
        self.messages_total = Counter(
            "websocket_messages_total", "WebSocket frames", ["direction", "type"], registry=r
        )
        self.delivery_latency = Histogram(
            "fanout_delivery_latency_seconds",
            "Publish-to-socket latency of deliveries",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.slow_consumer_closes = Counter(
            "fanout_slow_consumer_closes_total",
            "Connections closed 1013 for not reading",
            registry=r,
        )
        self.deliveries = self.messages_total.labels("out", "delivery")
