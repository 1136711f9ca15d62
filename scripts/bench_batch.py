"""Group-commit benchmark: the worker's batch write alone, A/B against another revision.

Drives `BatchWriter` as the worker does: C conversations at once, each storing a chat
and then its assistant reply, N times, so a batch holds about C requests. Reports, per
chat (its reply included): CPU of this process (the worker's side: asyncpg, the event
loop, the system calls of each round trip), CPU of the Postgres backends serving it
(read from /proc, so only for a local Postgres), and wall time. With `--against DIR`
(a tree of another revision, e.g. `git archive main | tar -x -C /tmp/main`) the runs
alternate between that tree's `common/store/batch.py` and this one's, and medians of
each are printed. Creates a database of its own (dropped afterwards).

    .venv/bin/python -O scripts/bench_batch.py --against /tmp/main --conversations 1,4,16,128

(-O: the writer's isinstance asserts would refuse the other tree's result classes.)
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

from bench_cluster import drop_database

from common.store.postgres import Store
from common.store.schema import migrate
from common.transport.entries import ChatEntry
from worker.writer import BatchWriter

TICK = os.sysconf("SC_CLK_TCK")


def load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")  # not a local Postgres
    return (int(fields[11]) + int(fields[12])) / TICK


async def run(url: str, batch: Any, conversations: int, chats: int) -> dict[str, float]:
    async with Store.open(url, max_size=4) as store:
        sessions = [
            (
                await store.create_session(
                    owner="ann", participants=[], agent="ai", ttl=600, metadata={}
                )
            ).id
            for _ in range(conversations)
        ]
        writer = BatchWriter(store, write=batch.write_batch)
        # Warm the pooled connections (prepared statements, row types) before measuring.
        await asyncio.gather(
            *(writer.chat(ChatEntry(s, "warm", "ann", "d", "x", None, 0)) for s in sessions)
        )
        backends = [
            r["pid"]
            for r in await store.fetch(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            )
        ]

        async def conversation(session_id: str) -> None:
            for n in range(chats):
                chat = ChatEntry(session_id, f"c{n}", "ann", "d", "hello", None, 0)
                written = await writer.chat(chat)
                if written is not None and written.reply_id is not None:
                    reply = batch.ReplyWrite(
                        session_id,
                        written.reply_id,
                        f"reply:{written.message.id}",
                        "assistant",
                        "hi",
                    )
                    await writer.reply(reply)

        pg_before = sum(cpu_seconds(p) for p in backends)
        cpu_before, wall_before = time.process_time(), time.perf_counter()
        batches_before, written_before = writer.batches, writer.written
        await asyncio.gather(*(conversation(s) for s in sessions))
        wall = time.perf_counter() - wall_before
        cpu = time.process_time() - cpu_before
        pg = sum(cpu_seconds(p) for p in backends) - pg_before
        n = conversations * chats
        return {
            "client_us": 1e6 * cpu / n,
            "postgres_us": 1e6 * pg / n,
            "wall_us": 1e6 * wall / n,
            "per_batch": (writer.written - written_before) / (writer.batches - batches_before),
        }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database-url", default="postgresql://127.0.0.1:5432/postgres")
    parser.add_argument("--against", type=Path, help="another revision's tree (A); this is B")
    parser.add_argument("--conversations", default="1,4,16,64,128")
    parser.add_argument("--chats", type=int, default=2000, help="chats per run, all told")
    parser.add_argument("--runs", type=int, default=5, help="runs of each variant")
    args = parser.parse_args()
    base = args.database_url.rsplit("/", 1)[0]
    name = f"fanout_bench_batch_{uuid.uuid4().hex[:8]}"
    url = f"{base}/{name}"
    await migrate(url)
    variants = {"B": load(Path(__file__).parent.parent / "common/store/batch.py", "b_batch")}
    if args.against is not None:
        variants["A"] = load(args.against / "common/store/batch.py", "a_batch")
    try:
        print("conversations variant client_us postgres_us wall_us requests/batch")
        for conversations in map(int, args.conversations.split(",")):
            chats = max(1, args.chats // conversations)
            results: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
            for i in range(args.runs):
                order = sorted(variants) if i % 2 == 0 else sorted(variants, reverse=True)
                for v in order:  # interleaved: the machine's noise hits both alike
                    results[v].append(await run(url, variants[v], conversations, chats))
            for v in sorted(variants):
                med = {k: statistics.median(r[k] for r in results[v]) for k in results[v][0]}
                print(
                    f"{conversations:13} {v:7} {med['client_us']:9.1f} {med['postgres_us']:11.1f}"
                    f" {med['wall_us']:7.1f} {med['per_batch']:14.1f}"
                )
    finally:
        await drop_database(f"{base}/postgres", name)


if __name__ == "__main__":
    asyncio.run(main())
