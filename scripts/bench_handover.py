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
so a noisy neighbour hits both; prints every run, then medians and ranges. Uses Redis
and Postgres at the default addresses (or `--redis-url`, `--postgres`), in a namespace
and a database of its own.
"""

from __future__ import annotations

import argparse
import asyncio
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

from bench_cluster import _listening, clear_namespace, drop_database, free_port  # noqa: E402


class Processes:
    """The fanout processes of one run, from one tree; all stopped on exit."""

    def __init__(self, tree: str, env: dict[str, str], logs: Path, tag: str) -> None:
        self.tree, self.env, self.logs, self.tag = tree, env, logs, tag
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        with (self.logs / f"{self.tag}-{name}.log").open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "common.cli", *args],
                env={**os.environ, **self.env, "FANOUT_NODE_ID": f"{self.tag}-{name}"},
                cwd=self.tree,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def worker(self, name: str) -> subprocess.Popen[bytes]:
        return self.spawn(name, ["worker", "--port", str(free_port())])

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *_: object) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def run_once(tree: str, env: dict[str, str], args: argparse.Namespace, tag: str) -> dict[str, Any]:
    with Processes(tree, env, Path(args.logs), tag) as procs:
        port = free_port()
        node = procs.spawn("node", ["node", "--port", str(port)])
        first = [procs.worker("worker1"), procs.worker("worker2")]
        deadline = time.monotonic() + 30
        while not _listening(port):
            if node.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{tag}: the node did not start (logs in {args.logs})")
            time.sleep(0.1)
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
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--postgres", default="postgresql://127.0.0.1:5432", help="server URL")
    args = parser.parse_args()
    trees = [tuple(t.split("=", 1)) for t in args.trees]
    Path(args.logs).mkdir(parents=True, exist_ok=True)
    run_id = secrets.token_hex(4)
    env = {
        "FANOUT_REDIS_URL": args.redis_url,
        "FANOUT_DATABASE_URL": f"{args.postgres}/fanout_ho_{run_id}",
        "FANOUT_NAMESPACE": f"ho{run_id}:",
        "FANOUT_JWT_SECRET": secrets.token_urlsafe(32),
        "FANOUT_DRAIN_TIMEOUT": "5",
        "PYTHONUNBUFFERED": "1",
    }
    subprocess.run(
        [sys.executable, "-m", "common.cli", "migrate"],
        env={**os.environ, **env},
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    replies: dict[str, list[dict[str, float]]] = {name: [] for name, _ in trees}
    try:
        for run in range(args.runs):
            for name, tree in trees:
                report = run_once(tree, env, args, f"{name}{run}-{run_id}")
                chat = report.get("chat") or {}
                reply = chat.get("reply_ms") or {}
                ack = chat.get("ack_ms") or {}
                replies[name].append(reply)
                print(
                    f"run {run} {name}: {chat.get('sent')} sent, "
                    f"{chat.get('replied_per_s', 0):,.0f}/s completed; reply p50 "
                    f"{reply.get('p50')} p99 {reply.get('p99')} max {reply.get('max')} ms; "
                    f"ack p99 {ack.get('p99')} ms; lost {report.get('lost')}",
                    flush=True,
                )
                clear_namespace(env["FANOUT_REDIS_URL"], env["FANOUT_NAMESPACE"])
    finally:
        clear_namespace(env["FANOUT_REDIS_URL"], env["FANOUT_NAMESPACE"])
        server = env["FANOUT_DATABASE_URL"].rsplit("/", 1)[0]
        asyncio.run(drop_database(f"{server}/postgres", f"fanout_ho_{run_id}"))
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


if __name__ == "__main__":
    main()
