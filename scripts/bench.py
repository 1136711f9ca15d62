"""The README benchmark table in one command: local clusters, `fanout loadtest`, a baseline.

    .venv/bin/python scripts/bench.py            # full run, about 10 minutes
    .venv/bin/python scripts/bench.py --quick    # one short run of each, about 2 minutes

It starts each cluster itself on this machine (nodes, 2 workers for fanout), in a
Redis namespace and a Postgres database of its own (the services at the default
addresses, or embedded ones: common/localcluster/embedded.py), and drives it with `fanout
loadtest` (500 users x 2 devices, 64-byte payloads by default):

- fanout at the maximum rate, `user` and `pattern` subscription modes, 1, 2 and 4 nodes,
  and the baseline forwarder (scripts/baseline_forwarder.py) at the same node counts;
- fanout and the baseline on 2 nodes at fixed 4,000 and 10,000 deliveries/s (latency);
- idle: 10,000 connections on 2 nodes, node RSS per connection (from /proc);
- chat on 2 nodes + 2 workers at a fixed rate (send -> ack, send -> reply on all devices);
- `redis`: Redis CPU per delivery against a bare PUBLISH, the forwarder's cost
  (scripts/bench_redis.py), and `handover`: reply latency while a worker joins and
  one leaves under 500 chats/s (scripts/bench_handover.py), each printed after the tables.

Node CPU comes from /proc/PID/stat over each measured window. Every figure is the
median of `--runs` runs; ratios compare fanout with the baseline from the same run
of this script. Raw reports go to `--out` as JSON. A `--budget` bounds the whole run:
scenarios that would start after it are skipped and listed as such.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import secrets
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_cluster import clear_namespace, drop_database, loadtest, running  # noqa: E402
from bench_plan import Result, Scenario, Spec, plan  # noqa: E402
from bench_table import machine, tables  # noqa: E402

from common.localcluster.embedded import local_services  # noqa: E402
from common.store.schema import migrate_sync  # noqa: E402

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
DEFAULT_POSTGRES = "postgresql://127.0.0.1:5432/postgres"
FD_LIMIT = 30_000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one short run of each scenario")
    parser.add_argument("--runs", type=int, default=None, help="runs per scenario (default 3)")
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--idle-connections", type=int, default=None, help="default 10000")
    parser.add_argument("--chat-rate", type=float, default=None, help="chats/s (default 1000)")
    parser.add_argument("--budget", type=float, default=None, help="seconds (default 660)")
    parser.add_argument("--only", default=None, help="run specs whose name contains this")
    parser.add_argument(
        "--kinds",
        default="max,rate,idle,chat,redis,handover",
        help="scenario kinds to run (comma-separated)",
    )
    parser.add_argument("--out", type=Path, default=None, help="raw reports (JSON)")
    args = parser.parse_args()
    args.runs = args.runs or (1 if args.quick else 3)
    args.idle_connections = args.idle_connections or (2000 if args.quick else 10_000)
    args.chat_rate = args.chat_rate or (300.0 if args.quick else 1000.0)
    budget = args.budget or (200.0 if args.quick else 660.0)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, FD_LIMIT)), hard))

    kinds = set(args.kinds.split(","))
    if not kinds <= {"max", "rate", "idle", "chat", *SIDE_BENCHES}:
        parser.error("--kinds takes max, rate, idle, chat, redis and handover")
    specs = [
        replace(s, scenarios=tuple(c for c in s.scenarios if c.kind in kinds))
        for s in plan(args)
        if args.only is None or args.only in s.name
    ]
    specs = [s for s in specs if s.scenarios]
    run_id = secrets.token_hex(4)
    data = ROOT / ".fanout-data" / "bench"
    started = time.monotonic()
    with local_services(data, redis_url=DEFAULT_REDIS, database_url=DEFAULT_POSTGRES) as svc:
        server = svc.database_url.rsplit("/", 1)[0]
        migrate_sync(f"{server}/fanout_bench_{run_id}")
        env = {
            "FANOUT_REDIS_URL": svc.redis_url,
            "FANOUT_DATABASE_URL": f"{server}/fanout_bench_{run_id}",
            "FANOUT_NAMESPACE": f"bench{run_id}:",
            "FANOUT_JWT_SECRET": secrets.token_urlsafe(32),
            "FANOUT_DRAIN_TIMEOUT": "3",
            "PYTHONUNBUFFERED": "1",
        }
        try:
            results = measure(specs, env, data / f"logs-{run_id}", started + budget)
            side = [
                side_bench(kind, args, svc.redis_url, server, started + budget)
                for kind in SIDE_BENCHES
                if kind in kinds and args.only is None
            ]
        finally:
            clear_namespace(svc.redis_url, env["FANOUT_NAMESPACE"])
            asyncio.run(drop_database(f"{server}/postgres", f"fanout_bench_{run_id}"))
    out_path = args.out or data / f"results-{run_id}.json"
    raw = [
        {
            "spec": r.spec.name,
            "scenario": r.scenario.label,
            "reports": r.reports,
            "failures": r.failures,
        }
        for r in results
    ]
    out_path.write_bytes(orjson.dumps(raw, option=orjson.OPT_INDENT_2))
    print(f"\n{machine()}; {time.monotonic() - started:.0f} s; medians of up to {args.runs} runs.")
    print(f"Command: .venv/bin/python scripts/bench.py {' '.join(sys.argv[1:])}\n")
    print(tables(results))
    for text in side:
        print(f"\n{text}")
    print(f"\nRaw reports: {out_path}")


# Benchmarks with clusters of their own, run after the tables' (their summary is printed).
SIDE_BENCHES = {
    "redis": ["scripts/bench_redis.py", "--duration", "4", "--no-key"],
    "handover": ["scripts/bench_handover.py", "--rate", "500", "this=."],
}


def side_bench(
    kind: str, args: argparse.Namespace, redis_url: str, postgres: str, deadline: float
) -> str:
    """One side benchmark's summary (its lines after the per-run ones)."""
    if time.monotonic() > deadline:
        return f"{kind}: skipped: over the time budget"
    print(f"bench: {kind} ...", file=sys.stderr, flush=True)
    cmd = [sys.executable, *SIDE_BENCHES[kind], "--runs", str(args.runs)]
    if kind == "handover":
        cmd += ["--redis-url", redis_url, "--postgres", postgres]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=900, check=False)
    out = done.stdout.decode()
    if done.returncode != 0:
        return f"{kind}: failed: {done.stderr.decode()[-300:]}"
    summary = out.split("\n\n", 1)[-1].strip()
    return f"{kind} (`{' '.join(cmd[1:])}`):\n{summary}"


def measure(specs: list[Spec], env: dict[str, str], logs: Path, deadline: float) -> list[Result]:
    """Each spec's cluster in turn, each of its scenarios `runs` times, until the deadline."""
    logs.mkdir(parents=True, exist_ok=True)
    results: list[Result] = []
    for spec in specs:
        pending = [Result(spec, s) for s in spec.scenarios]
        results += pending
        if time.monotonic() > deadline:
            for r in pending:
                r.failures.append("skipped: over the time budget")
            continue
        print(f"bench: {spec.name} ...", file=sys.stderr, flush=True)
        with running(spec, env, logs) as cluster:
            for result in pending:
                for _ in range(result.scenario.runs):
                    if time.monotonic() > deadline:
                        result.failures.append("skipped: over the time budget")
                        break
                    try:
                        report = loadtest(cluster, result.scenario, env)
                    except (RuntimeError, subprocess.TimeoutExpired) as exc:
                        result.failures.append(str(exc).splitlines()[-1][:200])
                        continue
                    result.reports.append(report)
                    _progress(result.scenario, report)
                    clear_namespace(env["FANOUT_REDIS_URL"], env["FANOUT_NAMESPACE"])
    return results


def _progress(scenario: Scenario, report: dict[str, Any]) -> None:
    servers = report.get("servers") or {}
    print(
        f"bench:   {scenario.label:<18} {report['deliveries_per_s']:>9,.0f}/s  "
        f"p99 {report['latency_ms'].get('p99', 0):>7.2f} ms  "
        f"node {servers.get('cpu_cores', 0):.2f} cores "
        f"({servers.get('deliveries_per_cpu_s') or 0:,.0f}/CPU-s)  lost {report['lost']}  "
        f"made {report['connections'].get('made')}",
        file=sys.stderr,
        flush=True,
    )


if __name__ == "__main__":
    main()
