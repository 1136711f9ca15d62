"""Two source trees' nodes, started alternately, through the same `fanout loadtest`.

    git archive main | tar -x -C /tmp/fanout-main
    .venv/bin/python scripts/bench_ab.py --runs 3 A=/tmp/fanout-main B=.
    .venv/bin/python scripts/bench_ab.py --mode fanout --connections 1000 --duration 6 A=... B=...

Each run starts 2 fresh nodes from one tree (`python -m common.cli node` with the
tree as the working directory, so its code is imported, with this venv's packages),
drives them with this tree's load generator (2 processes), stops them, and clears the
run's Redis keys; trees alternate run by run, so a noisy neighbour hits both. It prints
each run and the medians of node RSS per connection, deliveries per node CPU-second,
deliveries/s and Redis CPU per delivery (with `--tree-generator` each tree publishes
with its own Bus.deliver, so the last compares the trees' delivery scripts).
Uses Redis and Postgres at the default addresses, in a namespace and database of its own.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from bench_cluster import (  # noqa: E402
    free_port,
    run_loadtest,
    spawn,
    stop_process_groups,
    wait_listening,
)
from bench_trees import alternate, parse_trees, scratch_database, scratch_env  # noqa: E402

NODES = 2


def run_once(tree: str, env: dict[str, str], args: argparse.Namespace, tag: str) -> dict[str, Any]:
    nodes: list[tuple[subprocess.Popen[bytes], int]] = []
    logs = Path(args.logs)
    try:
        for i in range(NODES):
            port = free_port()
            command = ["-m", "common.cli", "node", "--port", str(port)]
            node_env = {**env, "FANOUT_NODE_ID": f"{tag}-{i}"}
            nodes.append((spawn(command, node_env, logs / f"{tag}-node{i}.log", cwd=tree), port))
        wait_listening(nodes, f"{tag}: a node did not start (logs in {logs})", timeout=30)
        time.sleep(1.0)  # the start-up settles before the RSS baseline is read
        cmd = ["-m", "common.cli", "loadtest", "--json", "--quiet"]
        cmd += ["--mode", args.mode, "--connections", str(args.connections)]
        cmd += ["--processes", "2", "--duration", str(args.duration)]
        for proc, port in nodes:
            cmd += ["--url", f"ws://127.0.0.1:{port}/ws", "--server-pid", str(proc.pid)]
        return run_loadtest(cmd, env, timeout=600, cwd=tree if args.tree_generator else ROOT)
    finally:
        stop_process_groups((proc for proc, _ in nodes), timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("trees", nargs="+", help="NAME=PATH of a source tree")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mode", default="idle")
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument(
        "--tree-generator",
        action="store_true",
        help="each tree's own load generator (its Bus.deliver: what a delivery costs Redis)",
    )
    parser.add_argument("--logs", default=str(ROOT / ".fanout-data" / "bench-ab"))
    args = parser.parse_args()
    trees = parse_trees(args.trees)
    Path(args.logs).mkdir(parents=True, exist_ok=True)
    run_id = secrets.token_hex(4)
    env = scratch_env("ab", run_id, drain_timeout=3)
    kib: dict[str, list[float]] = {name: [] for name, _ in trees}
    per_cpu: dict[str, list[float]] = {name: [] for name, _ in trees}
    rates: dict[str, list[float]] = {name: [] for name, _ in trees}
    redis_us: dict[str, list[float]] = {name: [] for name, _ in trees}
    with scratch_database(env):
        for run, name, tree in alternate(trees, args.runs, env):
            report = run_once(tree, env, args, f"{name}{run}-{run_id}")
            servers = report.get("servers") or {}
            kib[name].append(servers.get("rss_per_connection_kib") or 0.0)
            per_cpu[name].append(servers.get("deliveries_per_cpu_s") or 0.0)
            rate = report.get("deliveries_per_s") or 0.0
            rates[name].append(rate)
            # Redis CPU per delivery (the load test reads Redis' INFO over its window).
            cores = (report.get("loadtest") or {}).get("redis_cpu_cores") or 0.0
            redis_us[name].append(cores / rate * 1e6 if rate else 0.0)
            print(
                f"run {run} {name}: made {report['connections'].get('made')}, "
                f"connect {report['connections'].get('connect_ms')}, "
                f"{kib[name][-1]} KiB RSS per connection, "
                f"{report.get('deliveries_per_s', 0):,.0f} deliveries/s, "
                f"{per_cpu[name][-1]:,.0f} per node CPU-s, Redis "
                f"{redis_us[name][-1]:.2f} µs per delivery, lost {report.get('lost')}",
                flush=True,
            )
    for name, _ in trees:
        print(
            f"{name}: RSS per connection {kib[name]} KiB, median {statistics.median(kib[name])}; "
            f"deliveries per node CPU-s median {statistics.median(per_cpu[name]):,.0f}; "
            f"deliveries/s median {statistics.median(rates[name]):,.0f} "
            f"({min(rates[name]):,.0f}-{max(rates[name]):,.0f}); Redis µs per delivery median "
            f"{statistics.median(redis_us[name]):.2f} "
            f"({min(redis_us[name]):.2f}-{max(redis_us[name]):.2f})"
        )


if __name__ == "__main__":
    main()
