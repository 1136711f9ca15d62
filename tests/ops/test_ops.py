"""Operations (issue 6): cluster stats in Redis, Prometheus metrics, and a visible drain."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import time
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from common.transport.keys import Keys
from tests.support.api import request
from tests.support.harness import (
    ROOT,
    Cluster,
    Proc,
    connect,
    create_session,
    is_type,
)
from tests.support.ops import INTERVAL, TTL, chatting, eventually, metrics, stalled_client, stats


async def two_by_two(cluster: Cluster) -> tuple[Proc, Proc, Proc, Proc]:
    node1, node2 = await asyncio.gather(
        cluster.node("node-1", FANOUT_STATS_INTERVAL=INTERVAL),
        cluster.node("node-2", FANOUT_STATS_INTERVAL=INTERVAL),
    )
    worker1, worker2 = await asyncio.gather(
        cluster.worker("worker-1", FANOUT_STATS_INTERVAL=INTERVAL),
        cluster.worker("worker-2", FANOUT_STATS_INTERVAL=INTERVAL),
    )
    return node1, node2, worker1, worker2


def ids(records: list[dict[str, Any]]) -> set[str]:
    return {r["id"] for r in records}


async def test_stats_from_either_node_list_every_process_with_real_numbers(
    cluster: Cluster,
) -> None:
    node1, node2, _, _ = await two_by_two(cluster)
    session_id = await create_session(node1, "olga", ["pete"])
    async with connect(node1, "olga", "o1") as olga, connect(node2, "pete", "p1") as pete:
        async with chatting(olga, session_id):

            async def busy() -> dict[str, Any] | None:
                view = await stats(node2)
                totals = view["totals"]
                moving = totals["messages_in_per_s"] > 0 and totals["messages_out_per_s"] > 0
                return view if moving and totals["processed_per_s"] > 0 else None

            view = await eventually(busy, what="non-zero rates while chatting")

            async def charted() -> list[dict[str, Any]] | None:
                status, history = await request(node1, "GET", "/admin/history")
                assert status == 200, history
                points: list[dict[str, Any]] = history["points"]
                return points if any(p["messages_in_per_s"] for p in points) else None

            # One node (the historian) keeps the totals of the last minutes for the charts.
            points = await eventually(charted, what="traffic in the history")
            assert [p["t"] for p in points] == sorted(p["t"] for p in points)
            assert points[-1]["nodes"] == 2 and points[-1]["workers"] == 2
            assert set(points[-1]) >= {"t", "connections", "queue_depth", "latency_p99_ms"}
        await pete.until(is_type("message", message__role="assistant"))

        for node in (node1, node2):

            async def reported(node: Proc = node) -> dict[str, Any] | None:
                # Each process reports every INTERVAL: wait until all four have reported
                # the traffic above, instead of reading whatever was last written.
                view = await stats(node)
                by_id = {r["id"]: r for r in view["nodes"] + view["workers"]}
                if len(by_id) < 4:
                    return None
                ok = (
                    by_id["node-1"]["messages_in_total"] >= 1
                    and by_id["node-2"]["deliveries_total"] >= 1
                    and sum(by_id[w]["processed_total"] for w in ("worker-1", "worker-2")) >= 1
                    and sum(by_id[w]["partitions_owned"] for w in ("worker-1", "worker-2")) == 4
                )
                return view if ok else None

            view = await eventually(reported, what="every process reporting the traffic")
            assert ids(view["nodes"]) == {"node-1", "node-2"}
            assert ids(view["workers"]) == {"worker-1", "worker-2"}
            by_id = {r["id"]: r for r in view["nodes"] + view["workers"]}
            for record in by_id.values():
                assert record["uptime_s"] > 0
                assert record["rss_bytes"] > 10_000_000
                assert 0 < record["redis_rtt_ms"] < 1000
                assert record["loop_lag_ms"] >= 0
                assert record["gc_pause_ms"] >= 0
                assert record["draining"] is False
            assert by_id["node-1"]["connections"] == 1
            assert by_id["node-2"]["connections"] == 1
            assert by_id["node-1"]["messages_in_total"] >= 1
            assert by_id["node-2"]["deliveries_total"] >= 1
            assert (by_id["node-2"]["latency_p99_ms"] or 0) < 1000
            workers = [by_id["worker-1"], by_id["worker-2"]]
            assert sum(w["partitions_owned"] for w in workers) == 4
            assert sorted(p for w in workers for p in w["partitions"]) == [0, 1, 2, 3]
            assert sum(w["processed_total"] for w in workers) >= 1
            assert view["totals"]["connections"] == 2
            assert view["totals"]["nodes"] == 2 and view["totals"]["workers"] == 2
            queue = view["queue"]
            assert [p["partition"] for p in queue["partitions"]] == [0, 1, 2, 3]
            assert {p["owner"] for p in queue["partitions"]} <= {"worker-1", "worker-2"}
            assert queue["depth"] == sum(p["depth"] for p in queue["partitions"])
            assert view["served_by"] == node.name


async def test_killed_node_and_worker_leave_the_stats_within_the_ttl(cluster: Cluster) -> None:
    node1, node2, _, worker2 = await two_by_two(cluster)
    async with connect(node2, "quinn", "q1"):
        await eventually(lambda: _has_connection(node1, "quinn"), what="quinn listed")
        assert ids((await stats(node1))["nodes"]) == {"node-1", "node-2"}
        node2.kill()
        worker2.kill()
        killed = time.monotonic()

        async def gone() -> bool:
            view = await stats(node1)
            return "node-2" not in ids(view["nodes"]) and "worker-2" not in ids(view["workers"])

        await eventually(gone, timeout=TTL + 3, what="killed processes gone")
        # Gone within the TTL (plus one stats interval and the polling).
        assert time.monotonic() - killed <= TTL + 1.0
        assert not await _has_connection(node1, "quinn")


async def _has_connection(node: Proc, user_id: str) -> bool:
    status, body = await request(node, "GET", "/admin/connections")
    assert status == 200, body
    return any(item["user_id"] == user_id for item in body["items"])


def _value(samples: dict[str, float], key: str) -> float:
    return samples.get(key, 0.0)


async def test_metrics_parse_and_move_with_traffic(cluster: Cluster) -> None:
    node1, node2, worker1, worker2 = await two_by_two(cluster)
    before = await metrics(node2.url)
    for name in (
        "websocket_connections_active",
        "websocket_connections_total",
        "fanout_slow_consumer_closes_total",
        "fanout_delivery_latency_seconds_count",
        "process_resident_memory_bytes",
        "fanout_event_loop_lag_seconds",
        'fanout_queue_depth{partition="0"}',
        'fanout_queue_depth{partition="3"}',
    ):
        assert name in before, name
    # Histogram buckets from sub-millisecond to seconds.
    bounds = [float(k.split('"')[1]) for k in before if "latency_seconds_bucket" in k]
    assert min(bounds) < 0.001 and max(b for b in bounds if b != float("inf")) >= 1

    session_id = await create_session(node1, "rhea", ["sam"])
    async with connect(node1, "rhea", "r1") as rhea, connect(node2, "sam", "s1") as sam:
        for i in range(3):
            await rhea.chat(session_id, f"hello {i}")
        for _ in range(6):  # three messages and three replies
            await sam.until(is_type("message"))
        after1 = await metrics(node1.url)
        after2 = await metrics(node2.url)
        assert _value(after2, "websocket_connections_active") == 1
        assert _value(after2, "websocket_connections_total") == 1
        chats = 'websocket_messages_total{direction="in",type="chat"}'
        assert _value(after1, chats) == 3
        delivered = 'websocket_messages_total{direction="out",type="delivery"}'
        assert _value(after2, delivered) - _value(before, delivered) >= 6
        assert _value(after2, "fanout_delivery_latency_seconds_count") > _value(
            before, "fanout_delivery_latency_seconds_count"
        )
        assert _value(after2, "fanout_deliveries_total") >= 6

    processed = 0.0
    for worker in (worker1, worker2):
        samples = await metrics(worker.url)
        processed += _value(samples, "fanout_worker_processed_total")
        assert 'fanout_queue_depth{partition="2"}' in samples
        assert "process_resident_memory_bytes" in samples
        assert "fanout_worker_partitions_owned" in samples
    assert processed >= 3


async def test_drain_is_visible_in_readyz_and_stats(
    cluster: Cluster, redis: Any, namespace: str
) -> None:
    node1, node2 = await asyncio.gather(
        cluster.node("node-1", FANOUT_STATS_INTERVAL=INTERVAL),
        cluster.node(
            "node-2",
            FANOUT_STATS_INTERVAL=INTERVAL,
            FANOUT_DRAIN_TIMEOUT="4",
            FANOUT_SEND_QUEUE_BYTES=str(64 << 20),
        ),
    )
    # A client on a stalled network: once its buffers are full, the 1001 close frame
    # cannot be written; node-2 stays draining until it ends that socket (≈3 s).
    sock = await asyncio.to_thread(stalled_client, node2.port or 0, "tess")
    try:
        await eventually(lambda: _has_connection(node1, "tess"), what="tess listed")
        filler = b'{"type":"typing","pad":"' + b"x" * (1 << 20) + b'"}'
        for _ in range(12):  # more than the kernel buffers of both ends hold
            await redis.publish(Keys(namespace).user_channel("tess"), filler)
        await asyncio.sleep(0.5)
        node2.popen.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()

        async def not_ready() -> bool:
            with contextlib.suppress(aiohttp.ClientError):
                status, body = await request(node2, "GET", "/readyz", auth=None)
                return status == 503 and body["status"] == "draining"
            return False

        await eventually(not_ready, timeout=3, what="/readyz 503 while draining")

        async def shown_draining() -> bool:
            view = await stats(node1)
            node = next((n for n in view["nodes"] if n["id"] == "node-2"), None)
            draining = node is not None and node["draining"] is True
            return draining and view["totals"]["draining_nodes"] == 1

        await eventually(shown_draining, timeout=3, what="node-2 shown draining")
        assert node2.alive()
        # The stalled client is still there: the node exits within its drain timeout.
        assert await asyncio.to_thread(node2.popen.wait, 15) == 0
        assert time.monotonic() - stopped_at < 4 + 1.5, "stop exceeded FANOUT_DRAIN_TIMEOUT"
    finally:
        sock.close()
    view = await stats(node1)
    assert ids(view["nodes"]) == {"node-1"}, "a node that stopped cleanly leaves at once"


async def _metric_names(url: str) -> set[str]:
    """Every name a /metrics page can be queried by (families with no samples yet too)."""
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as resp:
        text = await resp.text()
    names = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + suffix for suffix in ("", "_total", "_bucket", "_count", "_sum"))
        names.update(s.name for s in family.samples)
    return names


async def test_grafana_dashboard_queries_only_exported_metrics(cluster: Cluster) -> None:
    node, worker = await asyncio.gather(cluster.node(), cluster.worker())
    exported = await _metric_names(node.url) | await _metric_names(worker.url)
    dashboard = json.loads((ROOT / "k8s" / "grafana-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert len(exprs) >= 20
    used = {
        name
        for expr in exprs
        for name in re.findall(r"\b((?:websocket|fanout|process)_[a-z_]+)\b", expr)
    }
    assert used, exprs
    assert used <= exported, sorted(used - exported)
    # The SPEC §7 names are all on the board.
    for name in (
        "websocket_connections_active",
        "websocket_connections_total",
        "websocket_messages_total",
        "fanout_delivery_latency_seconds_bucket",
        "fanout_queue_depth",
        "fanout_slow_consumer_closes_total",
    ):
        assert name in used, name
