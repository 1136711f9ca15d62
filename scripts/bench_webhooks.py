"""Chat reply latency with webhooks off, to a receiver that hangs, and to a prompt one.

    .venv/bin/python scripts/bench_webhooks.py               # 3 runs of each, ~3 minutes
    .venv/bin/python scripts/bench_webhooks.py --rate 200 --duration 8

SPEC §10: a slow or failing receiver never slows message delivery. Each run starts a
cluster (2 nodes, 2 workers, bench_cluster.running) with webhooks off, or on towards
a local receiver (tests/support/webhook_receiver.py, in a thread of this process) that either
never answers (every delivery waits out FANOUT_WEBHOOK_TIMEOUT, all
FANOUT_WEBHOOK_CONCURRENCY slots stay taken, the outbox grows) or answers 200 at once;
it drives the cluster with `fanout loadtest --mode chat` at a fixed rate. The
variants alternate run by run (so the machine's noise hits all alike) and the medians
of each are printed side by side, with what the receiver got.

    .venv/bin/python scripts/bench_webhooks.py --base-tree /path/to/other/checkout

adds the variant `base`: the prompt receiver with the workers (so the dispatcher)
running that tree's code, side by side with this tree's in the same command.
`--variants off,prompt,base` runs only those.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_chat import (  # noqa: E402
    COUNT_ROWS,
    LATENCY_ROWS,
    add_chat_arguments,
    chat_scenario,
    chat_services,
    chat_summary,
    in_thread,
    measure_chat,
    print_chat_heading,
    print_chat_table,
)
from bench_cluster import running  # noqa: E402
from bench_plan import Spec  # noqa: E402

from tests.support.webhook_receiver import receiving  # noqa: E402

SECRET = secrets.token_urlsafe(24)
NAMES = ("off", "hanging", "prompt")


async def empty_outbox(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("TRUNCATE webhook_outbox, webhook_dead_letters")
    finally:
        await conn.close()


def summary(reports: list[dict[str, Any]]) -> dict[str, float]:
    return {
        **chat_summary(reports, "receiver"),
        "webhooks answered": statistics.median(r["webhooks"]["answered"] for r in reports),
        "webhooks waiting": statistics.median(r["webhooks"]["hanging"] for r in reports),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_chat_arguments(parser, rate=100.0, connections=100)
    parser.add_argument("--base-tree", type=Path, help="workers of this tree: variant `base`")
    parser.add_argument("--variants", help="comma-separated subset of off,hanging,prompt,base")
    args = parser.parse_args()
    names: tuple[str, ...] = NAMES + (("base",) if args.base_tree else ())
    if args.variants:
        names = tuple(n for n in args.variants.split(",") if n in names)
    scenario = chat_scenario(args)
    spec = Spec("fanout", nodes=2)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    started = time.monotonic()
    with (
        chat_services("webhooks", "benchw") as services,
        in_thread(lambda: receiving(SECRET), "the webhook receiver") as rx,
    ):
        base = services.env
        hooks = {**base, "FANOUT_WEBHOOK_URL": rx.url, "FANOUT_WEBHOOK_SECRET": SECRET}
        variants = {"off": base, "hanging": hooks, "prompt": hooks, "base": hooks}
        try:
            for i in range(args.runs):
                order = names if i % 2 == 0 else names[::-1]
                for name in order:
                    rx.hanging = name == "hanging"
                    answered_before = len(rx.attempts)
                    # Each run starts with an empty outbox: no backlog of the run before.
                    asyncio.run(empty_outbox(services.database_url))
                    tree = args.base_tree if name == "base" else None
                    with running(spec, variants[name], services.logs, tree) as cluster:
                        # this process' CPU: the receiver's thread
                        report = measure_chat(cluster, scenario, variants[name], "receiver")
                        # Counted before the cluster stops (hanging ones end with it).
                        report["webhooks"] = {
                            "answered": len(rx.attempts) - answered_before,
                            "hanging": rx.hanging_now,
                        }
                    results[name].append(report)
                    chat = report["chat"]
                    print(
                        f"bench: run {i + 1} {name:8} reply p50 {chat['reply_ms']['p50']} ms,"
                        f" p99 {chat['reply_ms']['p99']} ms;"
                        f" replied {chat['replied_on_all_devices']}/{chat['sent']};"
                        f" webhooks answered {report['webhooks']['answered']},"
                        f" hanging {report['webhooks']['hanging']}",
                        file=sys.stderr,
                    )
        finally:
            rx.hanging = False
    summaries = {name: summary(results[name]) for name in names}
    print_chat_heading("bench_webhooks.py", args, started)
    print_chat_table(
        summaries,
        width=10,
        base=names[0],
        ratios=[(n, f"{n}/{names[0]}", 14) for n in names[1:]],
        latency_rows=[*LATENCY_ROWS, ("receiver CPU ms/chat", "receiver CPU ms/chat")],
        count_rows=[*COUNT_ROWS, "webhooks answered", "webhooks waiting"],
    )


if __name__ == "__main__":
    main()
