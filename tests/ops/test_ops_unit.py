"""Unit tests of the operations logic: quantiles, totals, the lock-free histogram, tallies."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from common.transport.cluster_stats import (
    HISTORY_FIELDS,
    history_point,
    merge_counts,
    quantile,
    queue_stats,
    summarize,
)
from common.transport.stats import LoopLag, Rates
from node.metrics import LATENCY_BUCKETS, LatencyHistogram, NodeMetrics
from worker.stats import ConsumerTally


def test_quantile_interpolates_within_the_bucket() -> None:
    bounds = [0.001, 0.01, 0.1]
    assert quantile(bounds, [0, 0, 0, 0], 0.99) is None
    assert quantile(bounds, [100, 0, 0, 0], 0.5) == pytest.approx(0.0005)
    # 99 fast, 1 slow: p99 is at the top of the fast bucket, p100 in the slow one.
    assert quantile(bounds, [99, 0, 1, 0], 0.99) == pytest.approx(0.001)
    assert quantile(bounds, [99, 0, 1, 0], 1.0) == pytest.approx(0.1)
    # Above the last bound, Prometheus' answer: the highest finite bound.
    assert quantile(bounds, [0, 0, 0, 5], 0.99) == 0.1


def test_merge_counts_adds_rows_of_any_length() -> None:
    assert merge_counts([[1, 2], [3, 4, 5], []]) == [4, 6, 5]


def _node(**fields: Any) -> dict[str, Any]:
    return {
        "id": "n",
        "connections": 0,
        "users": 0,
        "messages_in_per_s": 0.0,
        "latency_bounds": [0.001, 0.01],
        "latency_counts": [0, 0, 0],
        **fields,
    }


def test_summarize_sums_processes_and_merges_latency() -> None:
    nodes = [
        _node(id="a", connections=3, users=2, messages_in_per_s=1.5, latency_counts=[98, 0, 0]),
        _node(id="b", connections=4, users=4, draining=True, latency_counts=[0, 2, 0]),
    ]
    workers = [
        {"id": "w", "processed_per_s": 7.0, "failures_total": 2, "partitions_owned": 4},
        {"id": "v", "processed_per_s": 1.0, "failures_total": 0, "partitions_owned": 0},
    ]
    totals = summarize(nodes, workers, queue_depth=12)
    assert totals["nodes"] == 2 and totals["workers"] == 2
    assert totals["connections"] == 7 and totals["users"] == 6
    assert totals["draining_nodes"] == 1
    assert totals["messages_in_per_s"] == 1.5
    assert totals["processed_per_s"] == 8.0 and totals["failures_total"] == 2
    assert totals["partitions_owned"] == 4 and totals["queue_depth"] == 12
    # 98 observations under 1 ms and 2 under 10 ms: the p99 is in the second bucket.
    assert 1 < totals["latency_p99_ms"] <= 10
    assert summarize([], [], 0)["latency_p99_ms"] is None
    point = history_point(totals, 1234)
    assert point["t"] == 1234 and set(point) == {"t", *HISTORY_FIELDS}


def test_summarize_ignores_garbage_fields() -> None:
    nodes = [_node(connections="many", latency_counts="x"), _node(connections=True)]
    assert summarize(nodes, [], 0)["connections"] == 0


def test_queue_stats_lists_partitions_with_owners() -> None:
    assert queue_stats({1: 5, 0: 2}, [b"w1", None]) == {
        "depth": 7,
        "partitions": [
            {"partition": 0, "depth": 2, "owner": "w1"},
            {"partition": 1, "depth": 5, "owner": None},
        ],
    }


def test_latency_histogram_matches_prometheus_semantics() -> None:
    histogram = LatencyHistogram([0.001, 0.01])
    for seconds in (0.0005, 0.001, 0.005, 3.0):
        histogram.observe(seconds)
    assert histogram.counts == [2, 1, 1]  # a value equal to a bound is in that bucket
    family = histogram.family("x_seconds", "doc")
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name == "x_seconds_bucket"}
    assert buckets == {"0.001": 2, "0.01": 3, "+Inf": 4}


def test_node_metrics_export_hot_counters() -> None:
    metrics = NodeMetrics()
    metrics.delivered(3)
    metrics.delivered(2)
    metrics.received("chat")
    metrics.received("invalid")
    metrics.frames_broadcast += 4
    metrics.delivery_latency.observe(0.0002)
    text = generate_latest(metrics.registry).decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("websocket_messages_total", (("direction", "out"), ("type", "delivery")))] == 5
    assert samples[("websocket_messages_total", (("direction", "out"), ("type", "broadcast")))] == 4
    assert samples[("websocket_messages_total", (("direction", "in"), ("type", "chat")))] == 1
    assert samples[("fanout_deliveries_total", ())] == 2
    assert samples[("fanout_delivery_latency_seconds_count", ())] == 1
    assert min(LATENCY_BUCKETS) < 0.001 and max(LATENCY_BUCKETS) >= 1
    assert ("process_resident_memory_bytes", ()) in samples


def test_rates_are_per_second_and_never_negative(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    rates = Rates()
    assert rates.per_second({"a": 10.0}) == {"a": 0.0}  # the first sample has no past
    now[0] += 2
    assert rates.per_second({"a": 30.0}) == {"a": 10.0}
    now[0] += 1
    assert rates.per_second({"a": 5.0}) == {"a": 0.0}  # a counter reset is not negative


class _Consumer:
    def __init__(self, failures: int) -> None:
        self.failures, self.dead_lettered = failures, 0


def test_consumer_tally_keeps_counts_of_released_consumers() -> None:
    tally = ConsumerTally()
    first: Any = _Consumer(1)
    second: Any = _Consumer(0)
    tally.update([first, second])
    first.failures, first.dead_lettered = 3, 1
    tally.update([second])  # first released since: its last failures still count
    second.failures = 2
    tally.update([second])
    assert (tally.failures, tally.dead_lettered) == (5, 1)


def test_gc_pauses_are_timed_and_frozen_objects_are_skipped() -> None:
    import gc

    from common.gcpause import GcPauses, freeze_startup_objects

    with GcPauses() as pauses:
        gc.collect()
        assert pauses.collections >= 1 and pauses.take() >= 0.0
        assert pauses.take() == 0.0, "take() resets"
        thresholds = gc.get_threshold()
        freeze_startup_objects()
        try:
            assert gc.get_freeze_count() > 0
            assert gc.get_threshold()[2] == 100
        finally:
            gc.unfreeze()
            gc.set_threshold(*thresholds)
    collections = pauses.collections
    gc.collect()
    assert pauses.collections == collections, "the callback is gone after the block"


async def test_loop_lag_sees_a_blocked_loop() -> None:
    lag = LoopLag()
    task = asyncio.create_task(lag.run())
    await asyncio.sleep(0.06)
    time.sleep(0.2)  # block the loop on purpose
    await asyncio.sleep(0.06)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert lag.take() >= 0.1
    assert lag.take() == 0.0
