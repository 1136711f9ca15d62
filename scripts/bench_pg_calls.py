"""Postgres' own CPU per call of the worker's batch function, against simpler statements.

    .venv/bin/python scripts/bench_pg_calls.py --postgres postgresql://127.0.0.1:55432/postgres

Issue 17, target 1: where Postgres' CPU per chat goes. In a database of its own on the
given server (which should be a server of its own: its whole CPU is counted, the
postmaster, its live children and the children it reaped), it makes `--calls` calls of
each kind one after another on one connection and prints the server's CPU per call.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from bench_chat_cpu import _postmaster, server_cpu  # noqa: E402
from bench_cluster import drop_database  # noqa: E402

from common.store.batch import write_batch  # noqa: E402
from common.store.postgres import Store  # noqa: E402
from common.store.schema import migrate  # noqa: E402
from common.transport.entries import ChatEntry  # noqa: E402

SESSIONS = 50


def entry(session_id: str, client_id: str) -> ChatEntry:
    return ChatEntry(session_id, client_id, "ann", "phone", "hello", None, 0)


async def run(url: str, calls: int) -> None:
    await migrate(url)
    postmaster = await _postmaster(url)
    async with Store.open(url) as store:
        sessions = [
            (
                await store.create_session(
                    owner="ann", participants=[], agent="human", ttl=600, metadata={}
                )
            ).id
            for _ in range(SESSIONS)
        ]
        async with store.acquire() as conn:

            async def measure(label: str, call: Callable[[int], Awaitable[Any]]) -> None:
                cpu, wall = server_cpu(postmaster), time.perf_counter()
                for i in range(calls):
                    await call(i)
                cpu_us = 1e6 * (server_cpu(postmaster) - cpu) / calls
                wall_us = 1e6 * (time.perf_counter() - wall) / calls
                print(f"{label:34} Postgres {cpu_us:7.1f} µs/call   wall {wall_us:7.1f} µs/call")

            def chats(i: int, n: int) -> list[ChatEntry]:
                return [entry(sessions[(i * n + k) % SESSIONS], f"{n}-{i}-{k}") for k in range(n)]

            await measure("SELECT 1", lambda i: conn.fetchval("SELECT 1"))
            await measure("batch function, nothing to write", lambda i: write_batch(conn, [], []))
            await measure("batch function, 1 chat", lambda i: write_batch(conn, chats(i, 1), []))
            await measure("batch function, 8 chats", lambda i: write_batch(conn, chats(i, 8), []))
            await measure(
                "one message INSERT (autocommit)",
                lambda i: conn.execute(
                    "INSERT INTO messages (session_id, client_msg_id, role, user_id, content)"
                    " VALUES ($1, $2, 'user', 'ann', 'hello')",
                    uuid.UUID(sessions[i % SESSIONS]),
                    f"insert-{i}",
                ),
            )
            await measure(
                "one session UPDATE (autocommit)",
                lambda i: conn.execute(
                    "UPDATE sessions SET last_activity_at = now() WHERE id = $1",
                    uuid.UUID(sessions[i % SESSIONS]),
                ),
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--postgres", required=True, help="a Postgres server of its own")
    parser.add_argument("--calls", type=int, default=1000, help="calls of each kind")
    args = parser.parse_args()
    server = args.postgres.rsplit("/", 1)[0]
    database = f"fanout_bench_pg_calls_{secrets.token_hex(4)}"
    try:
        asyncio.run(run(f"{server}/{database}", args.calls))
    finally:
        asyncio.run(drop_database(f"{server}/postgres", database))


if __name__ == "__main__":
    main()
