"""The dispatcher's Prometheus families, read at scrape time (the worker's /metrics)."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from worker.webhooks.dispatcher import WebhookDispatcher


class WebhookCollector(Collector):
    """Sent, failed, retried and dead-lettered deliveries, and the oldest waiting event."""

    def __init__(self, dispatcher: WebhookDispatcher) -> None:
        self._dispatcher = dispatcher

    def collect(self) -> Iterable[Metric]:
        """The families, read from the dispatcher now."""
        counts = self._dispatcher.counts
        yield CounterMetricFamily(
            "fanout_webhooks_sent", "Webhook events delivered (2xx)", value=counts.sent
        )
        yield CounterMetricFamily(
            "fanout_webhooks_failed",
            "Webhook delivery attempts that failed (timeout, refused, non-2xx)",
            value=counts.failed,
        )
        yield CounterMetricFamily(
            "fanout_webhooks_retried",
            "Failed webhook events scheduled for another attempt",
            value=counts.retried,
        )
        yield CounterMetricFamily(
            "fanout_webhooks_dead_lettered",
            "Webhook events given up on after FANOUT_WEBHOOK_MAX_AGE",
            value=counts.dead_lettered,
        )
        yield GaugeMetricFamily(
            "fanout_webhooks_oldest_age_seconds",
            "Age of the oldest undelivered webhook event (read by the lease holder)",
            value=counts.oldest_age,
        )
