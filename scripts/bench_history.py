"""History benchmark: fill Postgres with messages, then time the history query (issue 4).

Creates a database of its own (dropped afterwards unless --keep), migrates it, fills
`--messages` messages spread round-robin over `--sessions` sessions (so a session's
rows are interleaved with everyone else's, as in production), ANALYZEs, and times
`Store.messages` — the query behind `GET /api/v1/sessions/{id}/messages` — one at a
time: the newest page of a random session, and a page further back (`before=` a
random message of that session). Target: p99 under 10 ms for the newest 50.

    .venv/bin/python scripts/bench_history.py                       # 1,000,000 in 10,000
    .venv/bin/python scripts/bench_history.py --messages 100000 --sessions 1000
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
import uuid

import asyncpg

from common.store.postgres import Store
from common.store.schema import migrate

CHUNK = 100_000


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def report(name: str, values: list[float]) -> str:
    return (
        f"{name}: n={len(values)} p50={pct(values, 0.50):.2f} ms p95={pct(values, 0.95):.2f} ms"
        f" p99={pct(values, 0.99):.2f} ms max={max(values) * 1000:.2f} ms"
    )


async def fill(conn: asyncpg.Connection, sessions: list[uuid.UUID], messages: int) -> None:
    await conn.executemany(
        "INSERT INTO sessions (id, owner, status, agent, ttl, expires_at)"
        " VALUES ($1, 'bench', 'running', 'human', 86400, now() + interval '1 day')",
        [(s,) for s in sessions],
    )
    await conn.executemany(
        "INSERT INTO participants (session_id, user_id) VALUES ($1, 'bench')",
        [(s,) for s in sessions],
    )
    started = time.perf_counter()
    for first in range(0, messages, CHUNK):
        last = min(first + CHUNK, messages)
        await conn.execute(
            "INSERT INTO messages (session_id, client_msg_id, role, user_id, device_id, content)"
            " SELECT ($1::uuid[])[1 + g % cardinality($1::uuid[])], 'b' || g, 'user', 'bench',"
            " 'd1', 'message number ' || g || ' with a little text to make it realistic'"
            " FROM generate_series($2::int, $3::int - 1) g",
            sessions,
            first,
            last,
        )
        rate = last / (time.perf_counter() - started)
        print(f"  filled {last:,} / {messages:,} messages ({rate:,.0f}/s)", flush=True)
    await conn.execute("ANALYZE sessions; ANALYZE messages")


async def measure(
    store: Store, sessions: list[uuid.UUID], queries: int, limit: int
) -> tuple[list[float], list[float]]:
    """Latencies (s) of the newest page and of a page before a random message."""
    newest: list[float] = []
    deeper: list[float] = []
    for _ in range(queries):
        session_id = str(random.choice(sessions))
        start = time.perf_counter()
        page = await store.messages(session_id, before=None, limit=limit)
        newest.append(time.perf_counter() - start)
        if not page:
            continue
        async with store.pool.acquire() as conn:
            pivot = await conn.fetchval(
                "SELECT id FROM messages WHERE session_id = $1"
                " ORDER BY id DESC OFFSET floor(random() * 100) LIMIT 1",
                uuid.UUID(session_id),
            )
        start = time.perf_counter()
        await store.messages(session_id, before=pivot, limit=limit)
        deeper.append(time.perf_counter() - start)
    return newest, deeper


async def main(args: argparse.Namespace) -> None:
    name = f"fanout_bench_{uuid.uuid4().hex[:8]}"
    base = args.database_url.rsplit("/", 1)[0]
    url = f"{base}/{name}"
    await migrate(url)
    try:
        sessions = [uuid.uuid4() for _ in range(args.sessions)]
        print(f"database {name}: {args.messages:,} messages in {args.sessions:,} sessions")
        started = time.perf_counter()
        conn = await asyncpg.connect(url)
        try:
            await fill(conn, sessions, args.messages)
            plan = await conn.fetch(
                "EXPLAIN SELECT * FROM messages WHERE session_id = $1 ORDER BY id DESC LIMIT 50",
                sessions[0],
            )
        finally:
            await conn.close()
        print(f"filled in {time.perf_counter() - started:.1f} s; plan:")
        for row in plan:
            print("   ", row[0])
        async with Store.open(url, max_size=2) as store:
            await measure(store, sessions, 200, args.limit)  # warm the cache and the pool
            newest, deeper = await measure(store, sessions, args.queries, args.limit)
        print(report(f"newest {args.limit} of a session", newest))
        print(report(f"{args.limit} before a random message", deeper))
    finally:
        if args.keep:
            print(f"kept database {name}")
        else:
            admin = await asyncpg.connect(f"{base}/postgres")
            try:
                await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            finally:
                await admin.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url", default="postgresql://127.0.0.1:5432/postgres")
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--limit", type=int, default=50)
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    asyncio.run(main(parser.parse_args()))
