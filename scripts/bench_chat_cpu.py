"""Chat latency and CPU per chat of every process, two source trees side by side.

    git archive main | tar -x -C /tmp/fanout-base
    .venv/bin/python scripts/bench_chat_cpu.py --postgres postgresql://127.0.0.1:55432/postgres \\
        --rate 1000 --runs 3 main=/tmp/fanout-base new=.

Issue 17, target 1. Each run starts 2 nodes and 2 workers from one tree (its directory
as their working directory, this venv's packages), waits for the partition leases to
settle, and drives them with this tree's `fanout loadtest --mode chat` at a fixed rate;
the trees alternate run by run. It prints send->ack and send->reply p99 and the CPU
per chat of the nodes, the workers and Postgres. Postgres' CPU is its whole server's
(the postmaster, its live children and the children it reaped), so `--postgres` should
name a server of its own: a private one (with `pg_stat_statements` preloaded, the
top statements by total time are printed per tree with `--statements`). The per-process
CPU covers the whole load test (connecting, creating and deleting the sessions too); the
"window" rows only its measured window: nodes, workers and Postgres together (the
processes the server had at its start), Redis (a shared one: other clients' work too), and
what the rest of the machine used.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from bench_chat import wait_for_leases  # noqa: E402
from bench_cluster import Cluster, clear_namespace, drop_database, loadtest  # noqa: E402
from bench_plan import Scenario, Spec  # noqa: E402
from bench_table import machine  # noqa: E402

from common.loadtest.report import cpu_seconds  # noqa: E402
from common.store.schema import migrate_sync  # noqa: E402

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
_TICK = os.sysconf("SC_CLK_TCK")
_TOP = """
SELECT calls, total_exec_time, rows, left(regexp_replace(query, '\\s+', ' ', 'g'), 110) AS query
FROM pg_stat_statements
WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
ORDER BY total_exec_time DESC LIMIT 12
"""


def _stat(pid: int) -> list[str]:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    return text[text.rindex(")") + 2 :].split()


def children(postmaster: int) -> list[int]:
    """The server's processes now: its backends and background workers."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            child = _stat(int(entry.name))
            if child and int(child[1]) == postmaster:
                found.append(int(entry.name))
    return found


class _WithPostgres:
    """The cluster as `loadtest` sees it, with the Postgres server's processes among the
    nodes: its in-window server CPU then covers nodes, workers and Postgres."""

    def __init__(self, cluster: Cluster, postgres: list[int]) -> None:
        self.urls, self.workers = cluster.urls, cluster.workers
        self.pids = cluster.pids + postgres


def server_cpu(postmaster: int) -> float:
    """CPU seconds of a Postgres server: its postmaster, live children, reaped children."""
    fields = _stat(postmaster)
    total = sum(int(f) for f in fields[11:15]) / _TICK
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            child = _stat(int(entry.name))
            if child and int(child[1]) == postmaster:
                total += (int(child[11]) + int(child[12])) / _TICK
    return total


async def _postmaster(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        backend = int(await conn.fetchval("SELECT pg_backend_pid()"))
        return int(_stat(backend)[1])
    finally:
        await conn.close()


async def _statements(url: str, reset: bool) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(url)
    try:
        if reset:
            await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            await conn.execute("SELECT pg_stat_statements_reset()")
            return []
        rows = await conn.fetch(_TOP)
        return [dict(r) for r in rows]
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("trees", nargs="+", help="NAME=PATH of a source tree")
    parser.add_argument("--postgres", required=True, help="a Postgres server of its own")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rate", type=float, default=1000.0, help="chats/s")
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per run")
    parser.add_argument(
        "--settle", type=float, default=10.0, help="seconds a late reply may take (else lost)"
    )
    parser.add_argument("--statements", action="store_true", help="top pg_stat_statements")
    parser.add_argument(
        "--py-spy",
        type=Path,
        default=None,
        help="record a worker and a node with py-spy (not a dependency) into this folder",
    )
    args = parser.parse_args()
    trees = dict(t.split("=", 1) for t in args.trees)
    run_id = secrets.token_hex(4)
    logs = ROOT / ".fanout-data" / "bench" / f"logs-chat-cpu-{run_id}"
    logs.mkdir(parents=True, exist_ok=True)
    scenario = Scenario(
        "chat", args.rate, args.connections, args.duration, runs=1, processes=1, settle=args.settle
    )
    warm_up = Scenario("chat", args.rate, args.connections, 1.0, runs=1, processes=1, settle=1)
    server = args.postgres.rsplit("/", 1)[0]
    database = f"fanout_bench_chat_cpu_{run_id}"
    url = f"{server}/{database}"
    migrate_sync(url)
    import asyncio

    postmaster = asyncio.run(_postmaster(url))
    namespace = f"benchc{run_id}:"
    env = {
        "FANOUT_REDIS_URL": args.redis_url,
        "FANOUT_DATABASE_URL": url,
        "FANOUT_NAMESPACE": namespace,
        "FANOUT_JWT_SECRET": secrets.token_urlsafe(32),
        "FANOUT_ASSISTANT": "echo",
        "FANOUT_DRAIN_TIMEOUT": "3",
        "PYTHONUNBUFFERED": "1",
    }
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    statements: dict[str, list[dict[str, Any]]] = {}
    started = time.monotonic()
    try:
        for i in range(args.runs):
            order = list(trees) if i % 2 == 0 else list(trees)[::-1]
            for name in order:
                cluster = Cluster(Spec("fanout", nodes=2), env, logs, Path(trees[name]).resolve())
                cluster.start()
                try:
                    wait_for_leases(args.redis_url, namespace)
                    # A short load first, so the processes' Postgres connections are open
                    # (and so counted in the window) and the caches warm.
                    loadtest(cluster, warm_up, env)
                    if args.statements:
                        asyncio.run(_statements(url, reset=True))
                    groups = {"workers": [w.pid for w in cluster.workers], "nodes": cluster.pids}
                    before = {g: sum(map(cpu_seconds, ps)) for g, ps in groups.items()}
                    pg_before = server_cpu(postmaster)
                    spies = []
                    if args.py_spy and i == 0:
                        args.py_spy.mkdir(parents=True, exist_ok=True)
                        targets = {"worker": cluster.workers[0].pid, "node": cluster.pids[0]}
                        spies = [
                            subprocess.Popen(
                                [
                                    *("py-spy", "record", "--nonblocking", "-r", "100"),
                                    *("-f", "raw", "-d", str(int(args.duration) + 3)),
                                    *(
                                        "-p",
                                        str(pid),
                                        "-o",
                                        str(args.py_spy / f"{name}-{role}.txt"),
                                    ),
                                ],
                                stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL,
                            )
                            for role, pid in targets.items()
                        ]
                    # Backends opened during the run are left out of the in-window figure.
                    postgres = [postmaster, *children(postmaster)]
                    report = loadtest(_WithPostgres(cluster, postgres), scenario, env)  # type: ignore[arg-type]
                    for spy in spies:
                        spy.wait(30)
                    sent = max(1, report["chat"]["sent"])
                    cpu = {
                        g: 1000 * (sum(map(cpu_seconds, ps)) - before[g]) / sent
                        for g, ps in groups.items()
                    }
                    cpu["postgres"] = 1000 * (server_cpu(postmaster) - pg_before) / sent
                    window = {
                        "all": 1000 * report["servers"]["cpu_seconds"] / sent,
                        "redis": 1000
                        * report["loadtest"]["redis_cpu_cores"]
                        * report["window_s"]
                        / sent,
                    }
                    report["window_cpu_ms_per_chat"] = window
                    report["cpu_ms_per_chat"] = cpu
                    if args.statements and i == 0:
                        statements[name] = asyncio.run(_statements(url, reset=False))
                finally:
                    cluster.stop()
                results[name].append(report)
                chat = report["chat"]
                print(
                    f"bench: run {i + 1} {name}: ack p99 {chat['ack_ms']['p99']} ms, reply p99"
                    f" {chat['reply_ms']['p99']} ms, replied {chat['replied_on_all_devices']}"
                    f"/{chat['sent']}, CPU ms/chat "
                    + ", ".join(f"{g} {v:.3f}" for g, v in cpu.items())
                    + f"; in the window: nodes+workers+postgres {window['all']:.3f}",
                    file=sys.stderr,
                )
    finally:
        clear_namespace(args.redis_url, namespace)
        asyncio.run(drop_database(f"{server}/postgres", database))
    (logs / "results.json").write_bytes(orjson.dumps(results))
    print(
        f"\n{machine()}; {time.monotonic() - started:.0f} s; medians of {args.runs} runs (range)."
    )
    print(f"Command: .venv/bin/python scripts/bench_chat_cpu.py {' '.join(sys.argv[1:])}")
    print(
        f"chat @ {args.rate:.0f}/s, {args.connections} connections, {args.duration:.0f} s a run\n"
    )
    rows: list[tuple[str, Any]] = [
        ("send->ack p50 ms", lambda r: r["chat"]["ack_ms"]["p50"]),
        ("send->ack p99 ms", lambda r: r["chat"]["ack_ms"]["p99"]),
        ("reply p50 ms", lambda r: r["chat"]["reply_ms"]["p50"]),
        ("reply p99 ms", lambda r: r["chat"]["reply_ms"]["p99"]),
        ("sent", lambda r: r["chat"]["sent"]),
        ("replied on all", lambda r: r["chat"]["replied_on_all_devices"]),
        ("lost", lambda r: r.get("lost", 0)),
        *[
            (f"{g} CPU ms/chat", lambda r, g=g: r["cpu_ms_per_chat"][g])
            for g in ("nodes", "workers", "postgres")
        ],
        ("sum CPU ms/chat", lambda r: sum(r["cpu_ms_per_chat"].values())),
        ("window n+w+pg ms/chat", lambda r: r["window_cpu_ms_per_chat"]["all"]),
        ("window redis ms/chat", lambda r: r["window_cpu_ms_per_chat"]["redis"]),
        ("window other cores", lambda r: r["loadtest"]["other_cpu_cores"]),
    ]
    print(f"{'':20}" + "".join(f"{n:>28}" for n in trees))
    for label, get in rows:
        cells = []
        for name in trees:
            values = [float(get(r)) for r in results[name]]
            cells.append(f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})")
        print(f"{label:20}" + "".join(f"{c:>28}" for c in cells))
    for name, top in statements.items():
        print(f"\npg_stat_statements, {name}, run 1 (calls, total ms, rows, query):")
        for s in top:
            print(f"  {s['calls']:7} {s['total_exec_time']:9.1f} {s['rows']:8}  {s['query']}")


if __name__ == "__main__":
    main()
