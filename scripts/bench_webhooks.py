"""Chat reply latency with webhooks off, to a receiver that hangs, and to a prompt one.

    .venv/bin/python scripts/bench_webhooks.py               # 3 runs of each, ~3 minutes
    .venv/bin/python scripts/bench_webhooks.py --rate 200 --duration 8

SPEC §10: a slow or failing receiver never slows message delivery. Each run starts a
cluster (2 nodes, 2 workers, bench_cluster.running) with webhooks off, or on towards
a local receiver (tests/webhook_receiver.py, in a thread of this process) that either
never answers (every delivery waits out FANOUT_WEBHOOK_TIMEOUT, all
FANOUT_WEBHOOK_CONCURRENCY slots stay taken, the outbox grows) or answers 200 at once;
it drives the cluster with `fanout loadtest --mode chat` at a fixed rate. The
variants alternate run by run (so the machine's noise hits all alike) and the medians
of each are printed side by side, with what the receiver got.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_assistant import wait_for_leases  # noqa: E402
from bench_cluster import clear_namespace, drop_database, loadtest, running  # noqa: E402
from bench_plan import Scenario, Spec  # noqa: E402
from bench_table import machine  # noqa: E402

from common.loadtest.report import cpu_seconds  # noqa: E402
from common.localcluster.embedded import local_services  # noqa: E402
from common.store.schema import migrate_sync  # noqa: E402
from tests.webhook_receiver import Receiver, receiving  # noqa: E402

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
DEFAULT_POSTGRES = "postgresql://127.0.0.1:5432/postgres"
SECRET = secrets.token_urlsafe(24)
NAMES = ("off", "hanging", "prompt")


@contextmanager
def receiver_thread() -> Iterator[Receiver]:
    """The receiver on its own event loop in a thread (so the load generator's and the
    cluster's CPU is not this process's)."""
    ready = threading.Event()
    found: list[Receiver] = []
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    async def serve() -> None:
        async with receiving(SECRET) as rx:
            found.append(rx)
            ready.set()
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    if not ready.wait(10):
        raise RuntimeError("the webhook receiver did not start")
    try:
        yield found[0]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)


async def empty_outbox(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("TRUNCATE webhook_outbox, webhook_dead_letters")
    finally:
        await conn.close()


def summary(reports: list[dict[str, Any]]) -> dict[str, float]:
    chats = [r["chat"] for r in reports]
    return {
        "ack_p50": statistics.median(c["ack_ms"]["p50"] for c in chats),
        "ack_p99": statistics.median(c["ack_ms"]["p99"] for c in chats),
        "reply_p50": statistics.median(c["reply_ms"]["p50"] for c in chats),
        "reply_p99": statistics.median(c["reply_ms"]["p99"] for c in chats),
        "sent": statistics.median(c["sent"] for c in chats),
        "replied": statistics.median(c["replied_on_all_devices"] for c in chats),
        "lost": max(r.get("lost", 0) for r in reports),
        **{
            f"{group} CPU ms/chat": statistics.median(r["cpu_ms_per_chat"][group] for r in reports)
            for group in ("workers", "nodes", "receiver")
        },
        "webhooks answered": statistics.median(r["webhooks"]["answered"] for r in reports),
        "webhooks waiting": statistics.median(r["webhooks"]["hanging"] for r in reports),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3, help="runs of each variant")
    parser.add_argument("--rate", type=float, default=100.0, help="chats/s")
    parser.add_argument("--connections", type=int, default=100)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    args = parser.parse_args()
    run_id = secrets.token_hex(4)
    data = ROOT / ".fanout-data" / "bench"
    logs = data / f"logs-webhooks-{run_id}"
    logs.mkdir(parents=True, exist_ok=True)
    scenario = Scenario(
        "chat", args.rate, args.connections, args.duration, runs=1, processes=1, settle=5
    )
    spec = Spec("fanout", nodes=2)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in NAMES}
    started = time.monotonic()
    with (
        local_services(data, redis_url=DEFAULT_REDIS, database_url=DEFAULT_POSTGRES) as svc,
        receiver_thread() as rx,
    ):
        server = svc.database_url.rsplit("/", 1)[0]
        database = f"fanout_bench_webhooks_{run_id}"
        migrate_sync(f"{server}/{database}")
        base = {
            "FANOUT_REDIS_URL": svc.redis_url,
            "FANOUT_DATABASE_URL": f"{server}/{database}",
            "FANOUT_NAMESPACE": f"benchw{run_id}:",
            "FANOUT_JWT_SECRET": secrets.token_urlsafe(32),
            "FANOUT_DRAIN_TIMEOUT": "3",
            "PYTHONUNBUFFERED": "1",
        }
        hooks = {**base, "FANOUT_WEBHOOK_URL": rx.url, "FANOUT_WEBHOOK_SECRET": SECRET}
        variants = {"off": base, "hanging": hooks, "prompt": hooks}
        try:
            for i in range(args.runs):
                order = NAMES if i % 2 == 0 else NAMES[::-1]
                for name in order:
                    rx.hanging = name == "hanging"
                    answered_before = len(rx.attempts)
                    # Each run starts with an empty outbox: no backlog of the run before.
                    asyncio.run(empty_outbox(f"{server}/{database}"))
                    with running(spec, variants[name], logs) as cluster:
                        wait_for_leases(svc.redis_url, base["FANOUT_NAMESPACE"])
                        groups = {
                            "workers": [w.pid for w in cluster.workers],
                            "nodes": cluster.pids,
                        }
                        before = {g: sum(map(cpu_seconds, ps)) for g, ps in groups.items()}
                        receiver_before = time.process_time()  # this process: the receiver
                        report = loadtest(cluster, scenario, variants[name])
                        sent = max(1, report["chat"]["sent"])
                        report["cpu_ms_per_chat"] = {
                            g: 1000 * (sum(map(cpu_seconds, ps)) - before[g]) / sent
                            for g, ps in groups.items()
                        }
                        report["cpu_ms_per_chat"]["receiver"] = (
                            1000 * (time.process_time() - receiver_before) / sent
                        )
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
            clear_namespace(svc.redis_url, base["FANOUT_NAMESPACE"])
            asyncio.run(drop_database(f"{server}/postgres", database))
    summaries = {name: summary(results[name]) for name in NAMES}
    off = summaries["off"]
    print(f"\n{machine()}; {time.monotonic() - started:.0f} s; medians of {args.runs} runs each.")
    print(f"Command: .venv/bin/python scripts/bench_webhooks.py {' '.join(sys.argv[1:])}")
    print(
        f"chat @ {args.rate:.0f}/s, {args.connections} connections, {args.duration:.0f} s a run\n"
    )
    print(f"{'':22}" + "".join(f"{n:>10}" for n in NAMES) + f"{'hang/off':>10}{'prompt/off':>12}")
    for key, label in (
        ("ack_p50", "send->ack p50 ms"),
        ("ack_p99", "send->ack p99 ms"),
        ("reply_p50", "reply p50 ms"),
        ("reply_p99", "reply p99 ms"),
        ("workers CPU ms/chat", "workers CPU ms/chat"),
        ("nodes CPU ms/chat", "nodes CPU ms/chat"),
        ("receiver CPU ms/chat", "receiver CPU ms/chat"),
    ):
        row = "".join(f"{summaries[n][key]:10.2f}" for n in NAMES)
        ratios = "".join(
            f"{summaries[n][key] / off[key] if off[key] else float('nan'):>{w}.2f}"
            for n, w in (("hanging", 10), ("prompt", 12))
        )
        print(f"{label:22}{row}{ratios}")
    for key in ("sent", "replied", "lost", "webhooks answered", "webhooks waiting"):
        print(f"{key:22}" + "".join(f"{summaries[n][key]:10.0f}" for n in NAMES))


if __name__ == "__main__":
    main()
