"""Reply latency while workers join and leave under chat load, two source trees side by side.

    git -C /work/main worktree add /tmp/fanout-main main   # or: git archive main | tar -x
    .venv/bin/python scripts/bench_handover.py --runs 3 A=/tmp/fanout-main B=.

Each run starts one node and two workers from one tree (its code, this venv's
packages), drives them with this tree's `fanout loadtest --mode chat` at `--rate`
chats/s, starts a third worker `--join-at` seconds into the load (scale-out: the
partitions are shared three ways) and stops one of the first two with SIGTERM at
`--leave-at` (scale-in / a rolling restart: its partitions go to the other two). A
partition that nobody consumes meanwhile shows as reply latency: the report is
send -> reply on all devices, p50/p99/max, and lost chats. Trees alternate run by run,
so a noisy neighbour hits both; prints every run, then medians and ranges (`--json
PATH`: every run's load test report there too, by tree). Uses Redis and Postgres at the
default addresses (or `--redis-url`, `--postgres`), in a namespace and a database of
its own.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from bench_cluster import free_port, spawn, stop_process_groups, wait_listening  # noqa: E402
from bench_trees import (  # noqa: E402
    DEFAULT_POSTGRES,
    DEFAULT_REDIS,
    alternate,
    parse_trees,
    scratch_database,
    scratch_env,
)


class Processes:
    """The fanout processes of one run, from one tree; all stopped on exit."""

    def __init__(self, tree: str, env: dict[str, str], logs: Path, tag: str) -> None:
        self.tree, self.env, self.logs, self.tag = tree, env, logs, tag
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        proc = spawn(
            ["-m", "common.cli", *args],
            {**self.env, "FANOUT_NODE_ID": f"{self.tag}-{name}"},
            self.logs / f"{self.tag}-{name}.log",
            cwd=self.tree,
        )
        self.procs.append(proc)
        return proc

    def worker(self, name: str) -> subprocess.Popen[bytes]:
        return self.spawn(name, ["worker", "--port", str(free_port())])

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *_: object) -> None:
        stop_process_groups(self.procs, timeout=30)


def run_once(tree: str, env: dict[str, str], args: argparse.Namespace, tag: str) -> dict[str, Any]:
    with Processes(tree, env, Path(args.logs), tag) as procs:
        port = free_port()
        node = procs.spawn("node", ["node", "--port", str(port)])
        first = [procs.worker("worker1"), procs.worker("worker2")]
        failure = f"{tag}: the node did not start (logs in {args.logs})"
        wait_listening([(node, port)], failure, timeout=30)
        time.sleep(args.warmup)  # the two workers share the partitions out
        cmd = [sys.executable, "-m", "common.cli", "loadtest", "--json", "--quiet"]
        cmd += ["--mode", "chat", "--connections", str(args.connections)]
        cmd += ["--rate", str(args.rate), "--duration", str(args.duration), "--settle", "10"]
        cmd += ["--url", f"ws://127.0.0.1:{port}/ws"]
        started = time.monotonic()
        load = subprocess.Popen(
            cmd,
            env={**os.environ, **env},
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        time.sleep(max(0.0, started + args.join_at - time.monotonic()))
        procs.worker("worker3")
        time.sleep(max(0.0, started + args.leave_at - time.monotonic()))
        first[0].send_signal(signal.SIGTERM)
        out, err = load.communicate(timeout=args.duration + 120)
        if not out.strip():
            raise RuntimeError(f"loadtest exited {load.returncode}: {err.decode()[-500:]}")
        report: dict[str, Any] = orjson.loads(out)
        return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("trees", nargs="+", help="NAME=PATH of a source tree")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rate", type=float, default=500, help="chats/s (default 500)")
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--duration", type=float, default=16.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--join-at", type=float, default=6.0, help="s after the load starts")
    parser.add_argument("--leave-at", type=float, default=12.0, help="s after the load starts")
    parser.add_argument("--logs", default=str(ROOT / ".fanout-data" / "bench-handover"))
    parser.add_argument("--redis-url", default=DEFAULT_REDIS)
    parser.add_argument("--postgres", default=DEFAULT_POSTGRES, help="server URL")
    parser.add_argument("--json", type=Path, default=None, help="write every run here (JSON)")
    args = parser.parse_args()
    trees = parse_trees(args.trees)
    Path(args.logs).mkdir(parents=True, exist_ok=True)
    run_id = secrets.token_hex(4)
    env = scratch_env(
        "ho", run_id, drain_timeout=5, redis_url=args.redis_url, postgres=args.postgres
    )
    replies: dict[str, list[dict[str, float]]] = {name: [] for name, _ in trees}
    reports: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in trees}
    with scratch_database(env):
        for run, name, tree in alternate(trees, args.runs, env):
            report = run_once(tree, env, args, f"{name}{run}-{run_id}")
            chat = report.get("chat") or {}
            reply = chat.get("reply_ms") or {}
            ack = chat.get("ack_ms") or {}
            replies[name].append(reply)
            reports[name].append(report)
            print(
                f"run {run} {name}: {chat.get('sent')} sent, "
                f"{chat.get('replied_per_s', 0):,.0f}/s completed; reply p50 "
                f"{reply.get('p50')} p99 {reply.get('p99')} max {reply.get('max')} ms; "
                f"ack p99 {ack.get('p99')} ms; lost {report.get('lost')}",
                flush=True,
            )
    print(
        f"\n{os.cpu_count()} CPUs, shared machine; chat at {args.rate:,.0f}/s, "
        f"{args.connections} connections, a worker joins at {args.join_at} s and one leaves "
        f"at {args.leave_at} s; medians of {args.runs} (range):"
    )
    for name, _ in trees:
        cells = []
        for key in ("p50", "p99", "max"):
            values = sorted(r.get(key, 0.0) for r in replies[name])
            cells.append(
                f"{key} {statistics.median(values):,.0f} ({values[0]:,.0f}-{values[-1]:,.0f})"
            )
        print(f"  {name}: send -> reply on all devices, ms: {', '.join(cells)}")
    if args.json:
        settings = {"rate": args.rate, "connections": args.connections}
        timing = {"duration": args.duration, "join_at": args.join_at, "leave_at": args.leave_at}
        document = {**settings, **timing, "runs": reports}
        args.json.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
