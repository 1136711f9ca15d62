"""`fanout loadtest --processes P`: one test run by P load generator processes.

One Python process publishes and receives on one core; past some 50,000 deliveries/s
it, not the nodes, would set the pace. With P processes, process i drives users i,
i + P, ... (their devices at the node URLs a single process would have used) and
publishes to them at 1/P of the rate. The processes start together: each prints READY
once connected and waits for GO on stdin, then DONE when its window ends, then its
report as JSON. The parent reads the nodes' CPU between GO and the last DONE and
merges the reports: counts add up, latency histograms merge bucket by bucket.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
import uuid
from typing import Any

import orjson

from common.config import ConfigError
from common.loadtest.fleet import LoadConfig
from common.loadtest.report import (
    LatencyHistogram,
    Report,
    cpu_seconds,
    machine_busy_seconds,
    percentiles_ms,
    rss_bytes,
)

SUMMED = ("published", "expected", "delivered", "lost", "duplicated", "out_of_order", "gaps")
CONNECTION_COUNTS = ("target", "made", "failed", "reconnects", "failed_attempts")


async def shard_sync(stage: str) -> None:
    """In a shard: tell the parent where we are; once connected, wait for its GO."""
    sys.stdout.write(f"{stage.upper()}\n")
    sys.stdout.flush()
    if stage == "ready":
        line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        if line.strip() != "GO":
            raise ConnectionError("the parent load generator went away")


def shard_args(config: LoadConfig, shard: int, run_id: str) -> list[str]:
    """The command line of process `shard` (the secret travels in its environment)."""
    args = ["--json", "--quiet", "--mode", config.mode, "--connections", str(config.connections)]
    for url in config.urls:
        args += ["--url", url]
    for flag, value in (
        ("--devices", config.devices),
        ("--rate", config.rate),
        ("--duration", config.duration),
        ("--ramp", config.ramp),
        ("--payload", config.payload),
        ("--settle", config.settle),
        ("--window", config.window),
        ("--batch", config.batch),
        ("--connect-concurrency", config.connect_concurrency),
        ("--connect-timeout", config.connect_timeout),
        ("--processes", config.processes),
        ("--shard", shard),
        ("--run-id", run_id),
    ):
        args += [flag, str(value)]
    return [*args, "--keep-data"] if config.keep_data else args


async def run_processes(config: LoadConfig) -> Report:
    """Run the test in `config.processes` child processes; their merged report."""
    if config.mode == "chat":
        raise ConfigError("--processes is for the fanout and idle modes")
    run_id = uuid.uuid4().hex[:8]
    env = {**os.environ, "FANOUT_JWT_SECRET": config.secret}
    rss_before = [rss_bytes(p) for p in config.server_pids]
    procs: list[asyncio.subprocess.Process] = []
    try:
        for shard in range(config.processes):
            procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "common.cli",
                    "loadtest",
                    *shard_args(config, shard, run_id),
                    env=env,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                )
            )
        await _expect(procs, "READY", config.connect_timeout + config.ramp + 60)
        started, cpu_before = time.perf_counter(), [cpu_seconds(p) for p in config.server_pids]
        machine_before = machine_busy_seconds()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"GO\n")
            await proc.stdin.drain()
        await _expect(procs, "DONE", config.duration + 60)
        window = time.perf_counter() - started
        server_cpu = sum(cpu_seconds(p) for p in config.server_pids) - sum(cpu_before)
        machine_cpu = machine_busy_seconds() - machine_before
        rss_after = [rss_bytes(p) for p in config.server_pids]
        outs = await asyncio.wait_for(
            asyncio.gather(*(p.communicate() for p in procs)), config.settle + 120
        )
    finally:
        for proc in procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
    shards = [orjson.loads(out) for out, _ in outs]
    report = merge(config, shards, window)
    if config.server_pids:
        report.set_servers(config.server_pids, server_cpu, rss_before, rss_after)
    lag = LatencyHistogram()
    for shard in shards:
        lag.merge(shard["raw"]["loop_lag"])
    report.set_contention(machine_cpu=machine_cpu, lag=lag)
    return report


async def _expect(procs: list[asyncio.subprocess.Process], word: str, within: float) -> None:
    async def one(proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        line = await proc.stdout.readline()
        if line.strip() != word.encode():
            raise RuntimeError(f"a load generator process stopped before {word} ({line[:200]!r})")

    await asyncio.wait_for(asyncio.gather(*(one(p) for p in procs)), within)


def merge(config: LoadConfig, shards: list[dict[str, Any]], window: float) -> Report:
    """One report from the shards' reports (each with its `raw` part)."""
    report = Report(config.mode, config.urls, config.public())
    latency, publish = LatencyHistogram(), LatencyHistogram()
    connect: list[float] = []
    counts = dict.fromkeys(CONNECTION_COUNTS, 0)
    closes: dict[str, int] = {}
    own_cpu = rss = rss_grown = 0.0
    redis_cores: list[float] = []
    postgres_cores: list[float] = []
    for shard in shards:
        raw = shard["raw"]
        latency.merge(raw["latency"])
        publish.merge(raw["publish"])
        connect += raw["connect_s"]
        own_cpu += raw["own_cpu_seconds"]
        report.delivered_in_window += raw["delivered_in_window"]
        for key in SUMMED:
            setattr(report, key, getattr(report, key) + shard[key])
        for key, n in shard["errors"].items():
            if key != "total":
                report.errors[key] = report.errors.get(key, 0) + n
        for key in CONNECTION_COUNTS:
            counts[key] += shard["connections"][key]
        for code, n in shard["connections"]["closes"].items():
            closes[code] = closes.get(code, 0) + n
        made = shard["connections"]["made"]
        rss += shard["loadtest"]["rss_mib"] * 2**20
        rss_grown += shard["loadtest"]["rss_per_connection_kib"] * 1024 * made
        redis_cores.append(shard["loadtest"]["redis_cpu_cores"])
        postgres_cores.append(shard["loadtest"]["postgres_cpu_cores"])
    report.connections = {**counts, "closes": closes, "connect_ms": percentiles_ms(connect)}
    report.window_s = window
    report.latency_ms = latency.summary_ms()
    report.publish_ms = publish.summary_ms() if publish.count else None
    # Each process read Redis' and Postgres' CPU over (nearly) the same window: one
    # reading stands.
    report.set_costs(
        own_cpu=own_cpu,
        rss=int(rss),
        rss_grown=int(rss_grown),
        redis_cpu=max(redis_cores, default=0.0) * window,
        postgres_cpu=max(postgres_cores, default=0.0) * window,
    )
    report.loadtest["processes"] = len(shards)
    return report
