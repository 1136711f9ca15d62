"""Client CPU per Redis command: the lean connection against redis-py, side by side.

    .venv/bin/python scripts/bench_commands.py --runs 3 --commands 20000 --tasks 100

The justification of common/transport/connection.py (and of borrowing redis-py's
internals through common/transport/redis_private.py): the node and the worker send many
small commands from many tasks at once. Each run sends the same commands through each
client in turn (alternating, so a noisy neighbour hits both): `--tasks` tasks, each
sending its share one after the other, a mix of GET, SET, INCR, HSET and PUBLISH on
keys of a namespace of its own (deleted after). It prints this process's CPU time per
command (what the client costs; Redis runs in its own process) and commands per
second, each run and the medians. Redis at $FANOUT_REDIS_URL (default 127.0.0.1:6379).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.runtime import run
from common.transport.connection import RespConnection, address_of

Send = Callable[..., Awaitable[Any]]


def commands(prefix: str, task: int, count: int) -> list[tuple[Any, ...]]:
    """One task's commands: the mix a node and a worker send, on the task's own keys."""
    key, counter, table = f"{prefix}k{task}", f"{prefix}n{task}", f"{prefix}h{task}"
    mix: list[tuple[Any, ...]] = [
        ("SET", key, b"x" * 64),
        ("GET", key),
        ("INCR", counter),
        ("HSET", table, "field", b"y" * 32),
        ("PUBLISH", f"{prefix}channel", b"z" * 128),
    ]
    return [mix[i % len(mix)] for i in range(count)]


async def drive(send: Send, prefix: str, total: int, tasks: int) -> tuple[float, float]:
    """(CPU µs per command, commands per second) for `total` commands from `tasks` tasks."""
    share = total // tasks
    plans = [commands(prefix, t, share) for t in range(tasks)]

    async def one(plan: list[tuple[Any, ...]]) -> None:
        for command in plan:
            await send(*command)

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one(plan) for plan in plans))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    sent = share * tasks
    return cpu / sent * 1e6, sent / wall


async def main(args: argparse.Namespace) -> None:
    url = os.environ.get("FANOUT_REDIS_URL", "redis://127.0.0.1:6379/0")
    client = aioredis.Redis.from_url(url)
    lean = RespConnection(address_of(client))
    prefix = f"benchcmd{secrets.token_hex(4)}:"
    clients: dict[str, Send] = {
        "redis-py": client.execute_command,
        "lean": lean.call,
    }
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in clients}
    try:
        for send in clients.values():  # warm-up: connections made, code paths hot
            await drive(send, prefix, 2000, args.tasks)
        for run_no in range(args.runs):
            for name, send in clients.items():
                cpu_us, rate = await drive(send, prefix, args.commands, args.tasks)
                results[name].append((cpu_us, rate))
                print(f"run {run_no} {name}: {cpu_us:.1f} µs CPU per command, {rate:,.0f}/s")
    finally:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
        await lean.close()
        await client.aclose()
    for name, runs in results.items():
        cpu = statistics.median(r[0] for r in runs)
        rate = statistics.median(r[1] for r in runs)
        print(f"{name}: median {cpu:.1f} µs CPU per command, {rate:,.0f} commands/s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--commands", type=int, default=20_000)
    parser.add_argument("--tasks", type=int, default=100)
    run(main(parser.parse_args()))
