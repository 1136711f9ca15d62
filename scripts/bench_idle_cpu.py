"""A node's CPU while it holds idle connections, two source trees side by side.

    git archive main | tar -x -C /tmp/fanout-main
    .venv/bin/python scripts/bench_idle_cpu.py --runs 3 main=/tmp/fanout-main new=.

Each run starts one fresh node from a tree (`python -m common.cli node`, the tree as
working directory, this venv's packages), opens `--connections` idle connections to it
with this tree's `fanout loadtest --mode idle` (2 processes) and holds them for
`--duration` seconds; the load test reads the node's utime+stime from /proc at the
start and end of that window. Printed per run and as medians: the node's cores, the
same per 10,000 connections, and its RSS per connection. Trees alternate run by run,
so a noisy neighbour hits both. With `--profile DIR` each node runs under cProfile
(`python -m cProfile -o DIR/<run>.prof`) — for finding where the time goes, not for
the numbers. Uses Redis and Postgres at the default addresses, in a namespace and
database of its own, removed at the end.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
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


def run_once(tree: str, env: dict[str, str], args: argparse.Namespace, tag: str) -> dict[str, Any]:
    logs = Path(args.logs)
    port = free_port()
    command = ["-m", "common.cli", "node", "--port", str(port)]
    if args.profile:
        command = ["-m", "cProfile", "-o", str(Path(args.profile) / f"{tag}.prof"), *command]
    node = spawn(command, {**env, "FANOUT_NODE_ID": tag}, logs / f"{tag}-node.log", cwd=tree)
    try:
        wait_listening([(node, port)], f"{tag}: the node did not start (log in {logs})", 30)
        time.sleep(1.0)  # the start-up settles before the RSS baseline is read
        cmd = ["-m", "common.cli", "loadtest", "--json", "--quiet"]
        cmd += ["--mode", "idle", "--connections", str(args.connections)]
        cmd += ["--processes", "2", "--duration", str(args.duration)]
        cmd += ["--url", f"ws://127.0.0.1:{port}/ws", "--server-pid", str(node.pid)]
        return run_loadtest(cmd, env, timeout=args.duration + 300)
    finally:
        stop_process_groups([node], timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("trees", nargs="+", help="NAME=PATH of a source tree")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds measured")
    parser.add_argument("--profile", default=None, help="a directory for cProfile output")
    parser.add_argument("--logs", default=str(ROOT / ".fanout-data" / "bench-idle"))
    args = parser.parse_args()
    trees = parse_trees(args.trees)
    Path(args.logs).mkdir(parents=True, exist_ok=True)
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    run_id = secrets.token_hex(4)
    env = scratch_env("idle", run_id, drain_timeout=3)
    cores: dict[str, list[float]] = {name: [] for name, _ in trees}
    kib: dict[str, list[float]] = {name: [] for name, _ in trees}
    with scratch_database(env):
        for run, name, tree in alternate(trees, args.runs, env):
            report = run_once(tree, env, args, f"{name}{run}-{run_id}")
            servers = report.get("servers") or {}
            made = report["connections"].get("made") or 0
            node_cores = servers.get("cpu_cores") or 0.0
            cores[name].append(node_cores / made * 10_000 if made else 0.0)
            kib[name].append(servers.get("rss_per_connection_kib") or 0.0)
            other = (report.get("loadtest") or {}).get("other_cpu_cores")
            print(
                f"run {run} {name}: made {made}, node {node_cores:.4f} cores over "
                f"{report.get('window_s', args.duration)} s = {cores[name][-1]:.4f} per 10,000 "
                f"connections, {kib[name][-1]} KiB RSS per connection "
                f"(other processes {other} cores)",
                flush=True,
            )
    for name, _ in trees:
        print(
            f"{name}: cores per 10,000 idle connections median "
            f"{statistics.median(cores[name]):.4f} "
            f"({min(cores[name]):.4f}-{max(cores[name]):.4f}); RSS per connection median "
            f"{statistics.median(kib[name])} KiB"
        )


if __name__ == "__main__":
    main()
