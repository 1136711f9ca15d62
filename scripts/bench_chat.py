"""Chat variants of this tree side by side (bench_assistant, bench_webhooks): the command-line
arguments they share, a run's Redis namespace and database on local services, a server on
its own event loop in a thread of this process, one measured `fanout loadtest --mode chat`
run with each process group's CPU per chat, and the medians printed as a table.

The importing script puts the repository root on sys.path first (this imports `common`)."""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import redis
from bench_cluster import ROOT, Cluster, clear_namespace, drop_database, loadtest
from bench_plan import Scenario
from bench_table import machine

from common.config import Settings
from common.loadtest.report import cpu_seconds
from common.localcluster.embedded import local_services
from common.store.schema import migrate_sync
from common.transport.keys import Keys

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
DEFAULT_POSTGRES = "postgresql://127.0.0.1:5432/postgres"
# The rows of the latency table, (summary key, label), and the rows counted in whole chats.
LATENCY_ROWS = (
    ("ack_p50", "send->ack p50 ms"),
    ("ack_p99", "send->ack p99 ms"),
    ("reply_p50", "reply p50 ms"),
    ("reply_p99", "reply p99 ms"),
    ("workers CPU ms/chat", "workers CPU ms/chat"),
    ("nodes CPU ms/chat", "nodes CPU ms/chat"),
)
COUNT_ROWS = ("sent", "replied", "lost")

T = TypeVar("T")


def add_chat_arguments(parser: argparse.ArgumentParser, rate: float, connections: int) -> None:
    """--runs, --rate (default `rate`), --connections (default `connections`), --duration."""
    parser.add_argument("--runs", type=int, default=3, help="runs of each variant")
    parser.add_argument("--rate", type=float, default=rate, help="chats/s")
    parser.add_argument("--connections", type=int, default=connections)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run")


def chat_scenario(args: argparse.Namespace) -> Scenario:
    """One run of `fanout loadtest --mode chat` at the arguments' rate."""
    return Scenario(
        "chat", args.rate, args.connections, args.duration, runs=1, processes=1, settle=5
    )


@dataclass(frozen=True)
class ChatServices:
    env: dict[str, str]  # every variant's FANOUT_* settings start from these
    logs: Path

    @property
    def redis_url(self) -> str:
        return self.env["FANOUT_REDIS_URL"]

    @property
    def database_url(self) -> str:
        return self.env["FANOUT_DATABASE_URL"]


@contextmanager
def chat_services(name: str, namespace_prefix: str) -> Iterator[ChatServices]:
    """Local Redis and Postgres (started if none listen at the defaults), a migrated database
    `fanout_bench_{name}_{run}` and a namespace `{namespace_prefix}{run}:`, both removed on
    exit; logs in .fanout-data/bench/logs-{name}-{run}."""
    run_id = secrets.token_hex(4)
    data = ROOT / ".fanout-data" / "bench"
    logs = data / f"logs-{name}-{run_id}"
    logs.mkdir(parents=True, exist_ok=True)
    with local_services(data, redis_url=DEFAULT_REDIS, database_url=DEFAULT_POSTGRES) as svc:
        server = svc.database_url.rsplit("/", 1)[0]
        database = f"fanout_bench_{name}_{run_id}"
        migrate_sync(f"{server}/{database}")
        env = {
            "FANOUT_REDIS_URL": svc.redis_url,
            "FANOUT_DATABASE_URL": f"{server}/{database}",
            "FANOUT_NAMESPACE": f"{namespace_prefix}{run_id}:",
            "FANOUT_JWT_SECRET": secrets.token_urlsafe(32),
            "FANOUT_DRAIN_TIMEOUT": "3",
            "PYTHONUNBUFFERED": "1",
        }
        try:
            yield ChatServices(env, logs)
        finally:
            clear_namespace(svc.redis_url, env["FANOUT_NAMESPACE"])
            asyncio.run(drop_database(f"{server}/postgres", database))


@contextmanager
def in_thread(serving: Callable[[], AbstractAsyncContextManager[T]], what: str) -> Iterator[T]:
    """`async with serving()` on its own event loop in a thread (so the load generator's and
    the cluster's CPU is not this process'), held open until exit; yields what it yields."""
    ready = threading.Event()
    found: list[T] = []
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    async def serve() -> None:
        async with serving() as value:
            found.append(value)
            ready.set()
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    if not ready.wait(10):
        raise RuntimeError(f"{what} did not start")
    try:
        yield found[0]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)


def wait_for_leases(redis_url: str, namespace: str, timeout: float = 30.0) -> None:
    """Until both workers hold partitions and none changed hands for a second: the
    hand-over right after start (issue 17, target 5) is not what this measures."""
    keys = Keys(namespace)
    names = [keys.partition_lease(p) for p in range(Settings().partitions)]
    client = redis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + timeout
        last: list[Any] = []
        stable_since = time.monotonic()
        while time.monotonic() < deadline:
            owners = client.mget(names)
            if owners != last:
                last, stable_since = owners, time.monotonic()
            elif (
                None not in owners
                and len(set(owners)) == 2
                and time.monotonic() - stable_since >= 1.0
            ):
                return
            time.sleep(0.1)
        print("bench:   partition leases did not settle; measuring anyway", file=sys.stderr)
    finally:
        client.close()


def measure_chat(
    cluster: Cluster, scenario: Scenario, env: dict[str, str], in_process: str
) -> dict[str, Any]:
    """Once the workers' leases settle, one loadtest run; its report with `cpu_ms_per_chat`
    of the workers, the nodes and `in_process` (this process: the servers in its threads)."""
    wait_for_leases(env["FANOUT_REDIS_URL"], env["FANOUT_NAMESPACE"])
    groups = {"workers": [w.pid for w in cluster.workers], "nodes": cluster.pids}
    before = {g: sum(map(cpu_seconds, ps)) for g, ps in groups.items()}
    own_before = time.process_time()
    report = loadtest(cluster, scenario, env)
    sent = max(1, report["chat"]["sent"])
    report["cpu_ms_per_chat"] = {
        g: 1000 * (sum(map(cpu_seconds, ps)) - before[g]) / sent for g, ps in groups.items()
    }
    report["cpu_ms_per_chat"][in_process] = 1000 * (time.process_time() - own_before) / sent
    return report


def chat_summary(reports: list[dict[str, Any]], in_process: str) -> dict[str, float]:
    """Medians over the runs (the most lost, for lost) of the latencies, counts and CPU."""
    chats = [r["chat"] for r in reports]
    return {
        "ack_p50": statistics.median(c["ack_ms"]["p50"] for c in chats),
        "ack_p99": statistics.median(c["ack_ms"]["p99"] for c in chats),
        "reply_p50": statistics.median(c["reply_ms"]["p50"] for c in chats),
        "reply_p99": statistics.median(c["reply_ms"]["p99"] for c in chats),
        "sent": statistics.median(c["sent"] for c in chats),
        "replied": statistics.median(c["replied_on_all_devices"] for c in chats),
        "lost": max(r.get("lost", 0) for r in reports),
        **{
            f"{group} CPU ms/chat": statistics.median(r["cpu_ms_per_chat"][group] for r in reports)
            for group in ("workers", "nodes", in_process)
        },
    }


def print_chat_heading(script: str, args: argparse.Namespace, started: float) -> None:
    print(f"\n{machine()}; {time.monotonic() - started:.0f} s; medians of {args.runs} runs each.")
    print(f"Command: .venv/bin/python scripts/{script} {' '.join(sys.argv[1:])}")
    print(
        f"chat @ {args.rate:.0f}/s, {args.connections} connections, {args.duration:.0f} s a run\n"
    )


def print_chat_table(
    summaries: dict[str, dict[str, float]],
    width: int,
    base: str,
    ratios: Sequence[tuple[str, str, int]],
    latency_rows: Sequence[tuple[str, str]],
    count_rows: Sequence[str],
) -> None:
    """A column of `width` for each variant, then a column per (variant, heading, width) in
    `ratios` of that variant's value over `base`'s; latency rows with two decimals, count
    rows whole."""
    names = list(summaries)
    ratio_headings = "".join(f"{heading:>{w}}" for _, heading, w in ratios)
    print(f"{'':22}" + "".join(f"{n:>{width}}" for n in names) + ratio_headings)
    for key, label in latency_rows:
        row = "".join(f"{summaries[n][key]:{width}.2f}" for n in names)
        over = summaries[base][key]
        cells = "".join(
            f"{summaries[n][key] / over if over else float('nan'):{w}.2f}" for n, _, w in ratios
        )
        print(f"{label:22}{row}{cells}")
    for key in count_rows:
        print(f"{key:22}" + "".join(f"{summaries[n][key]:{width}.0f}" for n in names))
