"""Chat latency with the `openai` reply generator against a local fake vs the built-in echo.

    .venv/bin/python scripts/bench_assistant.py               # 3 runs of each, ~2 minutes
    .venv/bin/python scripts/bench_assistant.py --rate 500 --duration 8

Issue 17, target 6: with the OpenAI-compatible generator against a local server that
answers at once, chat latency within 10% of echo. Each run starts a cluster (2 nodes,
2 workers) with FANOUT_ASSISTANT=echo or =openai, and drives it with `fanout loadtest
--mode chat` at a fixed rate; the variants alternate run by run (so the machine's
noise hits both alike) and the medians of each are printed side by side, with the
ratio openai/echo. The fake (tests/fake_openai.py) runs in a thread of this process
and answers exactly what echo answers ("You said: <content>", three words a chunk),
so the two differ only in the generator: the HTTP request, the SSE parsing and the
history query. `--webhooks` adds openai with webhooks on (a local receiver that
answers 204 at once), the whole of target 6. With `--against DIR` (another revision's
tree) a variant runs that tree's workers with echo: what this tree's reply path costs
echo itself.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_cluster import Cluster, clear_namespace, drop_database, loadtest, running  # noqa: E402
from bench_plan import Scenario, Spec  # noqa: E402
from bench_table import machine  # noqa: E402

from common.config import Settings  # noqa: E402
from common.loadtest.report import cpu_seconds  # noqa: E402
from common.localcluster.embedded import local_services  # noqa: E402
from common.store.schema import migrate_sync  # noqa: E402
from common.transport.keys import Keys  # noqa: E402
from tests.fake_openai import FakeOpenAI  # noqa: E402

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
DEFAULT_POSTGRES = "postgresql://127.0.0.1:5432/postgres"


@contextmanager
def fake_model() -> Iterator[tuple[str, str]]:
    """The fake model server and a webhook receiver that answers 204 at once, on their
    own event loop in a thread; yields their URLs."""
    ready = threading.Event()
    urls: list[str] = []
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    async def receive(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=204)

    async def serve() -> None:
        app = web.Application()
        app.router.add_post("/hook", receive)
        receiver = web.AppRunner(app, access_log=None)
        await receiver.setup()
        site = web.TCPSite(receiver, "127.0.0.1", 0)
        await site.start()
        try:
            async with FakeOpenAI(prefix="You said: ", words_per_chunk=3) as fake:
                port = receiver.addresses[0][1]
                urls.extend([fake.url, f"http://127.0.0.1:{port}/hook"])
                ready.set()
                await stop.wait()
        finally:
            await receiver.cleanup()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    if not ready.wait(10):
        raise RuntimeError("the fake model server did not start")
    try:
        yield urls[0], urls[1]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)


class TreeCluster(Cluster):
    """A cluster whose workers run another tree's code (its directory as their cwd)."""

    def __init__(self, tree: Path, spec: Spec, env: dict[str, str], logs: Path) -> None:
        super().__init__(spec, env, logs)
        self.tree = tree

    def _spawn(self, name: str, args: list[str], extra: dict[str, str]) -> subprocess.Popen[bytes]:
        if not name.startswith("worker"):
            return super()._spawn(name, args, extra)
        with (self.logs / f"{name}-tree.log").open("ab") as log:
            return subprocess.Popen(
                [sys.executable, *args],
                env={**os.environ, **self.env, **extra, "FANOUT_NODE_ID": name},
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.tree,
                start_new_session=True,
            )


@contextmanager
def running_from(
    tree: Path | None, spec: Spec, env: dict[str, str], logs: Path
) -> Iterator[Cluster]:
    """bench_cluster.running, with the workers from `tree` when given."""
    if tree is None:
        with running(spec, env, logs) as cluster:
            yield cluster
        return
    cluster = TreeCluster(tree, spec, env, logs)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def wait_for_leases(redis_url: str, namespace: str, timeout: float = 30.0) -> None:
    """Until both workers hold partitions and none changed hands for a second: the
    hand-over right after start (issue 17, target 5) is not what this measures."""
    keys = Keys(namespace)
    names = [keys.partition_lease(p) for p in range(Settings().partitions)]
    client = redis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + timeout
        last: list[Any] = []
        stable_since = time.monotonic()
        while time.monotonic() < deadline:
            owners = client.mget(names)
            if owners != last:
                last, stable_since = owners, time.monotonic()
            elif (
                None not in owners
                and len(set(owners)) == 2
                and time.monotonic() - stable_since >= 1.0
            ):
                return
            time.sleep(0.1)
        print("bench:   partition leases did not settle; measuring anyway", file=sys.stderr)
    finally:
        client.close()


def summary(reports: list[dict[str, Any]]) -> dict[str, float]:
    chats = [r["chat"] for r in reports]
    return {
        "ack_p50": statistics.median(c["ack_ms"]["p50"] for c in chats),
        "ack_p99": statistics.median(c["ack_ms"]["p99"] for c in chats),
        "reply_p50": statistics.median(c["reply_ms"]["p50"] for c in chats),
        "reply_p99": statistics.median(c["reply_ms"]["p99"] for c in chats),
        "replied": statistics.median(c["replied_on_all_devices"] for c in chats),
        "sent": statistics.median(c["sent"] for c in chats),
        "lost": max(r.get("lost", 0) for r in reports),
        **{
            f"{group} CPU ms/chat": statistics.median(r["cpu_ms_per_chat"][group] for r in reports)
            for group in ("workers", "nodes", "fake model")
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3, help="runs of each variant")
    parser.add_argument("--rate", type=float, default=200.0, help="chats/s")
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run")
    parser.add_argument(
        "--against",
        type=Path,
        default=None,
        help="another revision's tree (git archive main | tar -x -C DIR): its workers with"
        " echo as a third variant, to see what this tree's reply path costs echo",
    )
    parser.add_argument(
        "--webhooks",
        action="store_true",
        help="add openai with webhooks on (to a local receiver answering at once)",
    )
    parser.add_argument("--history", type=int, default=20, help="FANOUT_ASSISTANT_HISTORY")
    args = parser.parse_args()
    run_id = secrets.token_hex(4)
    data = ROOT / ".fanout-data" / "bench"
    logs = data / f"logs-assistant-{run_id}"
    logs.mkdir(parents=True, exist_ok=True)
    scenario = Scenario(
        "chat", args.rate, args.connections, args.duration, runs=1, processes=1, settle=5
    )
    spec = Spec("fanout", nodes=2)
    names = ["echo", "openai"]
    names += (["openai+hooks"] if args.webhooks else []) + (["echo@tree"] if args.against else [])
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    started = time.monotonic()
    with (
        local_services(data, redis_url=DEFAULT_REDIS, database_url=DEFAULT_POSTGRES) as svc,
        fake_model() as (model_url, hook_url),
    ):
        server = svc.database_url.rsplit("/", 1)[0]
        database = f"fanout_bench_assistant_{run_id}"
        migrate_sync(f"{server}/{database}")
        base = {
            "FANOUT_REDIS_URL": svc.redis_url,
            "FANOUT_DATABASE_URL": f"{server}/{database}",
            "FANOUT_NAMESPACE": f"bencha{run_id}:",
            "FANOUT_JWT_SECRET": secrets.token_urlsafe(32),
            "FANOUT_DRAIN_TIMEOUT": "3",
            "PYTHONUNBUFFERED": "1",
        }
        variants = {
            "echo": {**base, "FANOUT_ASSISTANT": "echo"},
            "openai": {
                **base,
                "FANOUT_ASSISTANT": "openai",
                "FANOUT_ASSISTANT_URL": model_url,
                "FANOUT_ASSISTANT_MODEL": "fake",
                "FANOUT_ASSISTANT_API_KEY": "sk-bench",
                "FANOUT_ASSISTANT_SYSTEM_PROMPT": "You are a benchmark.",
                "FANOUT_ASSISTANT_HISTORY": str(args.history),
            },
            "echo@tree": {**base, "FANOUT_ASSISTANT": "echo"},
        }
        variants["openai+hooks"] = {
            **variants["openai"],
            "FANOUT_WEBHOOK_URL": hook_url,
            "FANOUT_WEBHOOK_SECRET": secrets.token_urlsafe(32),
        }
        try:
            for i in range(args.runs):
                order = names if i % 2 == 0 else names[::-1]
                for name in order:
                    tree = args.against if name == "echo@tree" else None
                    with running_from(tree, spec, variants[name], logs) as cluster:
                        wait_for_leases(svc.redis_url, base["FANOUT_NAMESPACE"])
                        groups = {
                            "workers": [w.pid for w in cluster.workers],
                            "nodes": cluster.pids,
                        }
                        before = {g: sum(map(cpu_seconds, ps)) for g, ps in groups.items()}
                        fake_before = time.process_time()  # this process: the fake's thread
                        report = loadtest(cluster, scenario, variants[name])
                        sent = max(1, report["chat"]["sent"])
                        report["cpu_ms_per_chat"] = {
                            g: 1000 * (sum(map(cpu_seconds, ps)) - before[g]) / sent
                            for g, ps in groups.items()
                        }
                        report["cpu_ms_per_chat"]["fake model"] = (
                            1000 * (time.process_time() - fake_before) / sent
                        )
                    results[name].append(report)
                    chat = report["chat"]
                    print(
                        f"bench: run {i + 1} {name:6} reply p50 {chat['reply_ms']['p50']} ms,"
                        f" p99 {chat['reply_ms']['p99']} ms;"
                        f" replied {chat['replied_on_all_devices']}/{chat['sent']}",
                        file=sys.stderr,
                    )
        finally:
            clear_namespace(svc.redis_url, base["FANOUT_NAMESPACE"])
            asyncio.run(drop_database(f"{server}/postgres", database))
    summaries = {name: summary(results[name]) for name in names}
    echo = summaries["echo"]
    print(f"\n{machine()}; {time.monotonic() - started:.0f} s; medians of {args.runs} runs each.")
    print(f"Command: .venv/bin/python scripts/bench_assistant.py {' '.join(sys.argv[1:])}")
    print(
        f"chat @ {args.rate:.0f}/s, {args.connections} connections, {args.duration:.0f} s a run\n"
    )
    others = [n for n in names if n != "echo"]
    ratio_names = "".join(f"{n + '/echo':>19}" for n in others)
    print(f"{'':22}" + "".join(f"{n:>13}" for n in names) + ratio_names)
    for key, label in (
        ("ack_p50", "send->ack p50 ms"),
        ("ack_p99", "send->ack p99 ms"),
        ("reply_p50", "reply p50 ms"),
        ("reply_p99", "reply p99 ms"),
        ("workers CPU ms/chat", "workers CPU ms/chat"),
        ("nodes CPU ms/chat", "nodes CPU ms/chat"),
        ("fake model CPU ms/chat", "fake CPU ms/chat"),
    ):
        row = "".join(f"{summaries[n][key]:13.2f}" for n in names)
        ratios = "".join(
            f"{summaries[n][key] / echo[key] if echo[key] else float('nan'):19.2f}" for n in others
        )
        print(f"{label:22}{row}{ratios}")
    for key in ("sent", "replied", "lost"):
        print(f"{key:22}" + "".join(f"{summaries[n][key]:13.0f}" for n in names))
    if args.against:
        print(f"\necho@tree: the workers of {args.against} (nodes and load generator: this tree)")


if __name__ == "__main__":
    main()
