"""`fanout loadtest` counts right (issue 5): a clean run, a deliberately lossy one, --json."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from common.config import Settings
from common.loadtest.fleet import LoadConfig
from common.loadtest.report import LatencyHistogram, SeqRanges, postgres_cpu_seconds
from common.loadtest.run import run
from common.transport.bus import Bus, connect_redis
from tests.support.harness import ROOT, SECRET, Cluster, free_port

# --- pure bookkeeping ------------------------------------------------------------------


def test_seq_ranges_count_what_is_missing() -> None:
    got = SeqRanges()
    for seq in (1, 2, 3, 6, 7, 9):
        got.add(seq)
    got.add(5)  # late, below the newest
    assert got.ranges == [[1, 3], [5, 7], [9, 9]]
    assert (4 in got, 5 in got, len(got)) == (False, True, 7)
    wanted = SeqRanges()
    for seq in range(1, 11):
        wanted.add(seq)
    assert got.missing_from(wanted) == 3  # 4, 8, 10
    assert got.missing_from(wanted, above=8) == 1  # 10


def test_latency_histogram_percentiles_are_close() -> None:
    hist = LatencyHistogram()
    samples = [*range(1, 1001), *range(10_000, 1_010_000, 1000)]
    for us in samples:
        hist.record(us)
    ordered = sorted(samples)
    for q in (0.5, 0.95, 0.99):
        exact = ordered[round(q * len(ordered)) - 1]
        assert abs(hist.percentile(q) - exact) <= exact * 0.002 + 1
    assert hist.percentile(1.0) == hist.max_us == max(samples)


# --- against a cluster -----------------------------------------------------------------


async def _two_nodes(cluster: Cluster) -> list[str]:
    nodes = await asyncio.gather(cluster.node(), cluster.node())
    return [n.ws_url for n in nodes]


def _config(urls: list[str], **overrides: Any) -> LoadConfig:
    base: dict[str, Any] = {
        "urls": urls,
        "secret": SECRET,
        "connections": 50,
        "devices": 2,
        "rate": 1000,
        "duration": 2.0,
        "settle": 3.0,
        "progress": False,
    }
    return LoadConfig(**{**base, **overrides})


async def test_clean_run_counts_every_delivery(cluster: Cluster, settings: Settings) -> None:
    report = await run(_config(await _two_nodes(cluster)), settings)

    assert report.connections["made"] == 50
    assert report.connections["failed"] == 0
    assert report.published > 0
    # Every publish reaches both devices of its user, and nothing else arrives.
    assert report.expected == 2 * report.published
    assert report.delivered == report.expected
    assert (report.lost, report.duplicated, report.out_of_order, report.gaps) == (0, 0, 0, 0)
    assert report.latency_ms["count"] == report.delivered
    assert 0 < report.latency_ms["p50"] <= report.latency_ms["p99"] <= report.latency_ms["max"]
    assert report.deliveries_per_s == pytest.approx(1000, rel=0.3)


async def test_lossy_bus_is_reported(cluster: Cluster, settings: Settings) -> None:
    """Every 4th publish takes a seq but never reaches the log or the channel."""
    urls = await _two_nodes(cluster)
    redis = await connect_redis(settings)
    bus = Bus(redis, settings)
    calls = skipped = 0

    async def lossy(users: list[str], body: bytes) -> dict[str, int]:
        nonlocal calls, skipped
        calls += 1
        if calls % 4:
            return await bus.deliver(users, body)
        # A seq assigned and then lost on the way: resume and gap repair cannot find it.
        skipped += len(users)
        return {u: int(await redis.incr(bus.keys.seq(u))) for u in users}

    try:
        report = await run(_config(urls), settings, deliver=lossy)
    finally:
        await redis.aclose()

    assert skipped > 0
    assert report.lost == 2 * skipped  # both devices of each user miss each skipped seq
    assert report.delivered == report.expected - report.lost
    assert report.gaps > 0
    assert (report.duplicated, report.out_of_order) == (0, 0)


async def test_fixed_rate_publishing_does_not_wait_for_replies(
    cluster: Cluster, settings: Settings
) -> None:
    """A Redis that answers late must not slow the publishing down: the frames it holds
    up are late (and measured so), not left unsent until it answers."""
    urls = await _two_nodes(cluster)
    redis = await connect_redis(settings)
    bus = Bus(redis, settings)

    async def slow(users: list[str], body: bytes) -> dict[str, int]:
        seqs = await bus.deliver(users, body)
        await asyncio.sleep(0.3)  # the reply, not the delivery, comes late
        return seqs

    try:
        report = await run(_config(urls, rate=1000, duration=1.0), settings, deliver=slow)
    finally:
        await redis.aclose()

    # 1000 deliveries/s to 2 devices per user for 1 s: 500 user publishes are due. Each
    # call waiting for the one before would have sent some 300 of them.
    assert report.published >= 450
    assert report.lost == 0 and report.delivered == report.expected


async def test_cli_json_report(cluster: Cluster, env: dict[str, str]) -> None:
    urls = await _two_nodes(cluster)
    args = ["--connections", "10", "--duration", "1", "--rate", "200", "--settle", "3"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "common.cli",
        "loadtest",
        "--json",
        "--quiet",
        *[a for u in urls for a in ("--url", u)],
        *args,
        "--server-pid",
        str(cluster.procs[0].popen.pid),
        env={**os.environ, **env},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    report = orjson.loads(out)

    assert report["mode"] == "fanout"
    assert "secret" not in report["settings"]
    assert report["connections"]["made"] == 10
    assert set(report["connections"]["connect_ms"]) == {"count", "p50", "p99", "max"}
    assert report["delivered"] == report["expected"] == 2 * report["published"] > 0
    assert set(report["latency_ms"]) == {"count", "p50", "p95", "p99", "max"}
    assert (report["lost"], report["duplicated"], report["out_of_order"]) == (0, 0, 0)
    assert report["errors"]["total"] == 0
    assert report["deliveries_per_s"] > 0
    assert report["loadtest"]["cpu_seconds"] >= 0
    assert "cores_per_1000_per_s" in report["loadtest"]
    assert set(report["loadtest"]["loop_lag_ms"]) == {"count", "p50", "p95", "p99", "max"}
    assert report["loadtest"]["other_cpu_cores"] >= 0
    assert report["loadtest"]["postgres_cpu_cores"] >= 0
    assert report["servers"]["pids"] == [cluster.procs[0].popen.pid]
    assert report["servers"]["cpu_seconds"] >= 0  # /proc counts in 10 ms ticks


def test_postgres_cpu_is_read_from_every_process_named_postgres() -> None:
    postgres = postgres_cpu_seconds()
    for pid, cpu in postgres.items():
        assert Path(f"/proc/{pid}/comm").read_text().strip() == "postgres"
        assert cpu >= 0
    assert os.getpid() not in postgres


async def test_chat_mode_matches_acks_and_replies(cluster: Cluster, settings: Settings) -> None:
    urls = await _two_nodes(cluster)
    await cluster.worker()
    report = await run(
        _config(urls, mode="chat", connections=10, rate=20, duration=1.0, settle=10.0),
        settings,
    )

    assert report.chat is not None
    assert report.chat["sent"] == report.chat["acked"] > 0
    assert report.chat["replied_on_all_devices"] == report.chat["sent"]
    # The stored message and the assistant's reply, each on both devices of the sender.
    assert report.expected == 4 * report.chat["acked"]
    assert report.lost == 0
    assert report.error_count == 0


async def test_the_benchmarks_baseline_forwarder_delivers_every_publish(
    env: dict[str, str], settings: Settings, tmp_path: Path
) -> None:
    # scripts/bench.py's ratios are against this forwarder, driven by the same generator
    # (which publishes through fanout's delivery script, stamp included): if it stopped
    # delivering, every ratio would be against nothing.
    port = free_port()
    log = (tmp_path / "forwarder.log").open("wb")
    forwarder = subprocess.Popen(
        [sys.executable, "scripts/baseline_forwarder.py", "--port", str(port)],
        env={**os.environ, **env},
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        for _ in range(100):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            except OSError:
                await asyncio.sleep(0.1)
        report = await run(_config([f"ws://127.0.0.1:{port}/ws"], connections=20), settings)
    finally:
        forwarder.terminate()
        forwarder.wait(10)
        log.close()
    assert report.published > 0
    assert report.delivered == report.expected == 2 * report.published
    assert (report.lost, report.duplicated, report.out_of_order) == (0, 0, 0)
