"""Redis CPU per delivery: the delivery script of two source trees against a bare PUBLISH.

    git -C /work/main worktree add /tmp/fanout-main main   # or: git archive main | tar -x
    .venv/bin/python scripts/bench_redis.py --runs 3 A=/tmp/fanout-main B=.

One private `redis-server` (a free port, no persistence) serves every run, so other
work on the shared Redis does not count. A run is one child process that subscribes
to `--users` user channels on a raw connection (the node's side: every publish goes to
one subscriber), then publishes to them for `--duration` seconds at a fixed `--rate`
of deliveries per second, `--batch` users per call, on the shared pipelined command
connection the workers use. Variants, alternated run by run so a noisy neighbour hits
all of them: `publish` (one bare PUBLISH per delivery, the forwarder's cost: the
target's baseline) and, per tree, `NAME` (Bus.deliver without a delivery key, as the
fan-out load test sends) and `NAME+key` (with one, as chat messages are sent). Redis
CPU is `used_cpu_user + used_cpu_sys` from INFO over the window; the command counts
(INFO commandstats, reset per run) show what each delivery did. Prints every run,
then medians and ranges, and each variant's ratio to `publish`; `--json PATH` also
writes every run's figures there (scripts/bench.py reads them for issue 17's target 2).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
from bench_cluster import free_port

ROOT = Path(__file__).resolve().parent.parent
PAYLOAD = b"x" * 64
TICK = 0.002
MAX_CALLS_IN_FLIGHT = 256


class _Drain(asyncio.Protocol):
    """The subscriber: counts the messages' bytes and throws them away."""

    def __init__(self) -> None:
        self.received = 0

    def data_received(self, data: bytes) -> None:
        self.received += len(data)


async def child(args: argparse.Namespace) -> None:
    """One measured run in this process (imports the tree's code)."""
    from common.config import Settings
    from common.transport.bus import Bus
    from common.transport.connection import RespConnection, pack

    url = f"redis://127.0.0.1:{args.port}/0"
    settings = Settings.from_env({"FANOUT_REDIS_URL": url, "FANOUT_NAMESPACE": "b:"})
    import redis.asyncio as aioredis

    redis = aioredis.Redis.from_url(url)
    commands = RespConnection({"host": "127.0.0.1", "port": args.port, "db": 0})
    bus = Bus(redis, settings, commands)
    users = [f"u{i}" for i in range(args.users)]
    drain = _Drain()
    transport, _ = await asyncio.get_running_loop().create_connection(
        lambda: drain, "127.0.0.1", args.port
    )
    transport.write(pack("SUBSCRIBE", *(bus.keys.user_channel(u) for u in users)))
    await asyncio.sleep(0.5)
    keyed = args.child == "key"
    plain = args.child == "publish"
    seqs: dict[str, int] = dict.fromkeys(users, 0)

    async def one_call(batch: list[str], n: int) -> None:
        body = b'"ts":%d,"type":"notification","body":"%s"}' % (time.monotonic_ns(), PAYLOAD)
        if plain:
            sent = []
            for user in batch:
                seqs[user] += 1
                frame = b'{"seq":%d,%s' % (seqs[user], body)
                sent.append(commands.submit("PUBLISH", bus.keys.user_channel(user), frame))
            await asyncio.gather(*sent)
        else:
            await bus.deliver(batch, body, f"m{n}" if keyed else None)

    await commands.call("PING")
    await commands.call("CONFIG", "RESETSTAT")
    before = await commands.call("INFO", "cpu")
    started = time.monotonic()
    count = calls_made = cursor = 0
    calls: set[asyncio.Task[None]] = set()
    while (now := time.monotonic()) < started + args.duration:
        due = int((now - started) * args.rate) - count
        while due > 0 and len(calls) < MAX_CALLS_IN_FLIGHT:
            size = min(due, args.batch)
            batch = [users[(cursor + i) % len(users)] for i in range(size)]
            cursor, count, due, calls_made = cursor + size, count + size, due - size, calls_made + 1
            task = asyncio.create_task(one_call(batch, calls_made))
            calls.add(task)
            task.add_done_callback(calls.discard)
        await asyncio.sleep(max(0.0, started + (int((now - started) / TICK) + 1) * TICK - now))
    if calls:
        await asyncio.gather(*calls)
    window = time.monotonic() - started
    after = await commands.call("INFO", "cpu")
    stats = await commands.call("INFO", "commandstats")
    cpu = _cpu(after) - _cpu(before)
    counts: dict[str, tuple[int, float]] = {}
    for line in stats.decode().splitlines():
        if line.startswith("cmdstat_"):
            name, _, fields = line.removeprefix("cmdstat_").partition(":")
            values = dict(f.split("=", 1) for f in fields.split(","))
            counts[name] = (int(values["calls"]), float(values["usec"]))
    result = {
        "deliveries": count,
        "rate": count / window,
        "redis_cpu_s": cpu,
        "us_per_delivery": cpu / count * 1e6,
        "redis_cores": cpu / window,
        # Calls per delivery and Redis' own µs per delivery in each command (a script's
        # time includes the commands it calls).
        "commands_per_delivery": {
            k: (round(n / count, 2), round(us / count, 2))
            for k, (n, us) in sorted(counts.items())
            if k not in ("info", "ping", "config|resetstat", "hello", "subscribe")
        },
    }
    transport.close()
    await commands.close()
    await redis.aclose()
    print(orjson.dumps(result).decode())


def _cpu(info: bytes) -> float:
    fields = dict(line.split(":", 1) for line in info.decode().splitlines() if ":" in line)
    return float(fields["used_cpu_user"]) + float(fields["used_cpu_sys"])


def run_child(args: argparse.Namespace, port: int, variant: str, tree: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", variant, "--tree", tree, "--port", str(port)]
    cmd += ["--rate", str(args.rate), "--duration", str(args.duration)]
    cmd += ["--batch", str(args.batch), "--users", str(args.users)]
    done = subprocess.run(cmd, capture_output=True, timeout=args.duration + 60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{variant}: {done.stderr.decode()[-800:]}")
    result: dict[str, Any] = orjson.loads(done.stdout.splitlines()[-1])
    return result


@contextlib.contextmanager
def private_redis() -> Any:
    port = free_port()
    with tempfile.TemporaryDirectory() as data:
        proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                data,
                "--bind",
                "127.0.0.1",
            ],
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 10
            while True:
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.05)
            yield port
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("trees", nargs="*", help="NAME=PATH of a source tree")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rate", type=float, default=20_000, help="deliveries/s")
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--batch", type=int, default=100, help="users per call")
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--no-key", action="store_true", help="skip the keyed variants")
    parser.add_argument("--json", type=Path, default=None, help="write every run here (JSON)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tree", default=".", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, os.path.abspath(args.tree))  # the tree's code is measured
        asyncio.run(child(args))
        return
    trees = [tuple(t.split("=", 1)) for t in args.trees] or [("this", str(ROOT))]
    variants = [("publish", str(ROOT))]
    for name, tree in trees:
        variants.append((name, tree))
        if not args.no_key:
            variants.append((f"{name}+key", tree))
    results: dict[str, list[dict[str, Any]]] = {v: [] for v, _ in variants}
    with private_redis() as port:
        for run in range(args.runs):
            for variant, tree in variants:
                kind = "publish" if variant == "publish" else "key" if "+key" in variant else "bus"
                r = run_child(args, port, kind, tree)
                results[variant].append(r)
                print(
                    f"run {run} {variant:<12} {r['rate']:>8,.0f}/s  Redis {r['redis_cores']:.2f}"
                    f" cores  {r['us_per_delivery']:6.2f} µs/delivery  "
                    f"{r['commands_per_delivery']}",
                    flush=True,
                )
    print(
        f"\n{os.cpu_count()} CPUs, shared machine; {args.rate:,.0f} deliveries/s, {args.batch}"
        f" users per call, {args.users} users, {args.duration} s, medians of {args.runs}:"
    )
    base = statistics.median(r["us_per_delivery"] for r in results["publish"])
    for variant, runs in results.items():
        us = sorted(r["us_per_delivery"] for r in runs)
        med = statistics.median(us)
        print(
            f"  {variant:<12} {med:6.2f} µs/delivery (range {us[0]:.2f}-{us[-1]:.2f})"
            f"  {med / base:5.2f}x publish"
        )
    if args.json:
        settings = {"rate": args.rate, "batch": args.batch, "users": args.users}
        document = {**settings, "duration": args.duration, "runs": results}
        args.json.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
