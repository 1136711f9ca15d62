"""What the data limits cost Redis, side by side with a baseline in the same run.

- The log rewrite of a deleted session (common/transport/tombstones.py) holds Redis for
  one script per participant. Measured on a full log (FANOUT_USER_LOG_MAXLEN entries of
  `--frame` bytes, half of them the deleted session's), against the baseline of reading
  the same log once (XRANGE, what a full resume reads).
- The peer-rate check (common/transport/peer_rate.py) is one script per chat on the
  node. Measured per call for 1 and 99 recipients, against the baseline of one GET on
  the same connection (the session lookup every chat already makes).

Medians of `--runs` runs. Uses its own key prefix on the given Redis and deletes it.

    .venv/bin/python scripts/bench_data_limits.py --redis redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis

from common.config import Settings
from common.transport.bus import Bus
from common.transport.keys import Keys
from common.transport.peer_rate import PeerLimiter
from common.transport.tombstones import LogEraser

DOOMED = str(uuid.uuid4())
KEPT = str(uuid.uuid4())


async def _fill(bus: Bus, entries: int, frame_bytes: int) -> None:
    padding = "x" * max(0, frame_bytes - 120)
    for n in range(entries):
        session_id = DOOMED if n % 2 else KEPT
        body = f'"type":"message","session_id":"{session_id}","message":{{"content":"{padding}"}}}}'
        await bus.deliver(["u"], body.encode())


async def _timed(step: Callable[[], Awaitable[object]], calls: int) -> float:
    """Milliseconds per call of an async no-argument callable."""
    started = time.perf_counter()
    for _ in range(calls):
        await step()
    return (time.perf_counter() - started) * 1000 / calls


async def main(args: argparse.Namespace) -> None:
    redis = aioredis.Redis.from_url(args.redis)
    ns = f"bench-data-{uuid.uuid4().hex[:8]}:"
    keys = Keys(ns)
    bus = Bus(redis, Settings(namespace=ns, user_log_maxlen=args.entries))
    eraser = LogEraser(redis, keys)
    peers = PeerLimiter(redis, keys, rate=1e6, burst=10**9)
    try:
        read, erase = [], []
        for _ in range(args.runs):
            await redis.delete(keys.log("u"), keys.seq("u"))
            await _fill(bus, args.entries, args.frame)
            read.append(await _timed(lambda: redis.xrange(keys.log("u")), 1))
            erase.append(await _timed(lambda: eraser.erase(["u"], DOOMED), 1))
        print(
            f"log of {args.entries} x {args.frame} B: XRANGE (baseline) "
            f"{statistics.median(read):.2f} ms, rewrite {statistics.median(erase):.2f} ms"
            f" (median of {args.runs})"
        )
        await redis.set(f"{ns}probe", b"1")
        for recipients in (1, 99):
            others = [f"r{n}" for n in range(recipients)]
            base, check = [], []
            for _ in range(args.runs):
                base.append(await _timed(lambda: redis.get(f"{ns}probe"), args.calls))
                check.append(
                    await _timed(functools.partial(peers.refused, "s", others), args.calls)
                )
            print(
                f"peer check, {recipients} recipient(s): GET (baseline) "
                f"{statistics.median(base) * 1000:.0f} us, script "
                f"{statistics.median(check) * 1000:.0f} us per call (median of {args.runs})"
            )
    finally:
        await eraser.close()
        found = [k async for k in redis.scan_iter(match=f"{ns}*", count=1000)]
        if found:
            await redis.delete(*found)
        await redis.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--entries", type=int, default=1000, help="log length (MAXLEN)")
    parser.add_argument("--frame", type=int, default=1024, help="bytes per logged frame")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--calls", type=int, default=300, help="peer checks per run")
    asyncio.run(main(parser.parse_args()))
