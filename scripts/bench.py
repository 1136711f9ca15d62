"""The README benchmark table in one command: local clusters, `fanout loadtest`, a baseline.

    .venv/bin/python scripts/bench.py            # full run, about 15 minutes
    .venv/bin/python scripts/bench.py --quick    # one short run of each, about 2 minutes

It starts each cluster itself on this machine (nodes, 2 workers for fanout), in a
Redis namespace and a Postgres database of its own (the services at the default
addresses, or embedded ones: common/localcluster/embedded.py), and drives it with `fanout
loadtest` (500 users x 2 devices, 64-byte payloads by default):

- fanout at the maximum rate, `user` and `pattern` subscription modes, 1, 2 and 4 nodes,
  and the baseline forwarder (scripts/baseline_forwarder.py) at the same node counts;
- fanout and the baseline on 2 nodes at fixed 4,000 and 10,000 deliveries/s (latency);
- idle: 10,000 connections on 1 node (a fresh one each run), node RSS per connection
  and CPU (from /proc);
- chat on 2 nodes + 2 workers at a fixed rate (send -> ack, send -> reply on all devices);
- `redis`: Redis CPU per delivery against a bare PUBLISH, the forwarder's cost
  (scripts/bench_redis.py), `handover`: reply latency while a worker joins and one
  leaves under 500 chats/s (scripts/bench_handover.py), and `assistant`: chat latency
  with the OpenAI-compatible generator against a local fake and webhooks on, against
  echo without webhooks (scripts/bench_assistant.py --webhooks), each printed after the
  tables.

Last, "Targets (issue 17)": each target beside its baseline from this run, the ratio,
and met / not met / not measured (scripts/bench_targets.py). With `--base-tree DIR`
(another revision's tree: `git archive OLD | tar -x -C DIR`) the chat scenarios run
also with that tree's nodes and workers, a fresh cluster each run, the trees
alternating run by run: target 1's "CPU per chat ≤ half of today's".

Node CPU comes from /proc/PID/stat over each measured window, Postgres' from that of
every process named `postgres`, Redis' from INFO. Every figure is the median of
`--runs` runs; ratios compare fanout with the baseline from the same run of this
script. Raw reports go to `--out` as JSON (the side benches' beside them). A `--budget`
bounds the whole run: scenarios that would start after it are skipped and listed as such.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_chat import wait_for_leases  # noqa: E402
from bench_cluster import clear_namespace, drop_database, loadtest, running  # noqa: E402
from bench_plan import Result, Scenario, Spec, plan  # noqa: E402
from bench_rows import render  # noqa: E402
from bench_table import machine, tables  # noqa: E402
from bench_targets import target_rows  # noqa: E402

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
    parser.add_argument("--budget", type=float, default=None, help="seconds (default 1500)")
    parser.add_argument("--only", default=None, help="run specs whose name contains this")
    parser.add_argument(
        "--kinds",
        default="max,rate,idle,chat,redis,handover,assistant",
        help="scenario kinds to run (comma-separated)",
    )
    parser.add_argument(
        "--base-tree",
        type=Path,
        default=None,
        help="another revision's tree: the chat scenarios also with its nodes and workers",
    )
    parser.add_argument("--out", type=Path, default=None, help="raw reports (JSON)")
    args = parser.parse_args()
    args.runs = args.runs or (1 if args.quick else 3)
    args.idle_connections = args.idle_connections or (2000 if args.quick else 10_000)
    args.chat_rate = args.chat_rate or (300.0 if args.quick else 1000.0)
    budget = args.budget or (200.0 if args.quick else 1500.0)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, FD_LIMIT)), hard))

    kinds = set(args.kinds.split(","))
    if not kinds <= {"max", "rate", "idle", "chat", *SIDE_BENCHES}:
        parser.error(f"--kinds takes max, rate, idle, chat, {', '.join(SIDE_BENCHES)}")
    if args.base_tree is not None and not (args.base_tree / "common" / "cli.py").is_file():
        parser.error(f"--base-tree {args.base_tree}: not a fanout tree (no common/cli.py)")
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
        logs = data / f"logs-{run_id}"
        try:
            if args.base_tree is not None:
                # The chat scenarios on clusters of their own, this tree's and the base's.
                chats = [replace(s, scenarios=_chats(s, True)) for s in specs]
                specs = [replace(s, scenarios=_chats(s, False)) for s in specs]
            results = measure([s for s in specs if s.scenarios], env, logs, started + budget)
            base: list[Result] | None = None
            if args.base_tree is not None:
                ours, base = measure_trees(
                    [s for s in chats if s.scenarios],
                    env,
                    logs,
                    args.base_tree.resolve(),
                    started + budget,
                )
                results += ours
            side = {
                kind: side_bench(kind, args, svc.redis_url, server, started + budget)
                for kind in SIDE_BENCHES
                if kind in kinds and args.only is None
            }
        finally:
            clear_namespace(svc.redis_url, env["FANOUT_NAMESPACE"])
            asyncio.run(drop_database(f"{server}/postgres", f"fanout_bench_{run_id}"))
    out_path = args.out or data / f"results-{run_id}.json"
    raw = [
        {
            "spec": r.spec.name,
            "tree": tree,
            "scenario": r.scenario.label,
            "reports": r.reports,
            "failures": r.failures,
        }
        for tree, group in (("this", results), (str(args.base_tree), base or []))
        for r in group
    ]
    sides = {kind: document for kind, (_, document) in side.items()}
    document = {"results": raw, "side": sides}
    out_path.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))
    print(f"\n{machine()}; {time.monotonic() - started:.0f} s; medians of up to {args.runs} runs.")
    print(f"Command: .venv/bin/python scripts/bench.py {' '.join(sys.argv[1:])}\n")
    print(tables(results))
    if base:
        print(f"\nThe base tree ({args.base_tree}), its nodes and workers:\n")
        print(tables(base))
    for text, _ in side.values():
        print(f"\n{text}")
    print("\n## Targets (issue 17)\n")
    print(render(target_rows(results, sides, args.chat_rate, base)))
    print(f"\nRaw reports: {out_path}")


def _chats(spec: Spec, chat: bool) -> tuple[Scenario, ...]:
    return tuple(c for c in spec.scenarios if (c.kind == "chat") == chat)


# Benchmarks with clusters of their own, run after the tables' (their summary is printed,
# their `--json` document read for the targets).
SIDE_BENCHES = {
    "redis": ["scripts/bench_redis.py", "--duration", "4", "--no-key"],
    "handover": ["scripts/bench_handover.py", "--rate", "500", "this=."],
    "assistant": ["scripts/bench_assistant.py", "--webhooks"],
}


def side_bench(
    kind: str, args: argparse.Namespace, redis_url: str, postgres: str, deadline: float
) -> tuple[str, dict[str, Any] | str]:
    """One side benchmark's summary (its lines after the per-run ones) and its JSON
    document, or why there is none."""
    if time.monotonic() > deadline:
        return f"{kind}: skipped: over the time budget", "skipped: over the time budget"
    print(f"bench: {kind} ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / f"{kind}.json"
        cmd = [sys.executable, *SIDE_BENCHES[kind], "--runs", str(args.runs), "--json", str(path)]
        if kind == "handover":
            cmd += ["--redis-url", redis_url, "--postgres", postgres]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, timeout=900, check=False)
        if done.returncode != 0:
            why = f"failed: {done.stderr.decode()[-300:]}"
            return f"{kind}: {why}", why.splitlines()[-1][:200]
        document: dict[str, Any] = orjson.loads(path.read_bytes())
    # Without the per-run lines (the summaries' headings and tables stay as printed).
    lines = done.stdout.decode().splitlines()
    summary = "\n".join(line for line in lines if not line.startswith("run ")).strip("\n")
    shown = " ".join(a for a in cmd[1:] if not a.startswith(("--json", scratch)))
    return f"{kind} (`{shown}`):\n{summary}", document


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
        # Idle runs each start fresh processes: RSS per connection is read against the
        # node's RSS before the run, which a previous run's freed sockets would lower.
        fresh = any(r.scenario.kind == "idle" for r in pending)
        for _ in range(max(r.scenario.runs for r in pending) if fresh else 1):
            with running(spec, env, logs) as cluster:
                for result in pending:
                    for _ in range(1 if fresh else result.scenario.runs):
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


def measure_trees(
    specs: list[Spec], env: dict[str, str], logs: Path, base_tree: Path, deadline: float
) -> tuple[list[Result], list[Result]]:
    """Each spec's scenarios `runs` times with this tree's nodes and workers and with
    `base_tree`'s, a fresh cluster for every run once its workers' leases settle, the trees
    alternating run by run; this tree's results and the base tree's."""
    ours: list[Result] = []
    theirs: list[Result] = []
    for spec in specs:
        for scenario in spec.scenarios:
            pair = [(Result(spec, scenario), None), (Result(spec, scenario), base_tree)]
            ours.append(pair[0][0])
            theirs.append(pair[1][0])
            for run in range(scenario.runs):
                for result, tree in pair if run % 2 == 0 else pair[::-1]:
                    if time.monotonic() > deadline:
                        result.failures.append("skipped: over the time budget")
                        continue
                    name = "base tree" if tree else "this tree"
                    print(f"bench: {spec.name} ({name}) ...", file=sys.stderr, flush=True)
                    with running(spec, env, logs, tree, tree) as cluster:
                        wait_for_leases(env["FANOUT_REDIS_URL"], env["FANOUT_NAMESPACE"])
                        try:
                            report = loadtest(cluster, scenario, env)
                        except (RuntimeError, subprocess.TimeoutExpired) as exc:
                            result.failures.append(str(exc).splitlines()[-1][:200])
                            report = None
                    clear_namespace(env["FANOUT_REDIS_URL"], env["FANOUT_NAMESPACE"])
                    if report is not None:
                        result.reports.append(report)
                        _progress(scenario, report)
    return ours, theirs


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
