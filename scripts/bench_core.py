"""Quick core-path benchmark against a running cluster (e.g. `scripts/dev up`).

Opens N WebSocket connections round-robin over the node URLs (users × 2 devices) and
reports connect time (TCP + upgrade + `welcome`); then S senders each send C chats one
after another and it reports send → `ack` and send → own `message` (stored in Postgres
and fanned out) latency. Bounded in count and time.

    .venv/bin/python scripts/bench_core.py --url ws://127.0.0.1:8080/ws \\
        --url ws://127.0.0.1:8081/ws --secret "$FANOUT_JWT_SECRET" --connections 1000
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import time
import uuid

import aiohttp
import orjson

from common.auth import mint_token


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def summary(name: str, values: list[float]) -> str:
    return (
        f"{name}: n={len(values)} p50={pct(values, 0.50):.2f} ms "
        f"p99={pct(values, 0.99):.2f} ms max={max(values) * 1000:.2f} ms "
        f"mean={statistics.fmean(values) * 1000:.2f} ms"
    )


async def open_ws(
    http: aiohttp.ClientSession, url: str, token: str, device: str
) -> tuple[aiohttp.ClientWebSocketResponse, float]:
    start = time.perf_counter()
    ws = await http.ws_connect(
        url,
        params={"device_id": device},
        headers={"Authorization": f"Bearer {token}"},
        timeout=aiohttp.ClientWSTimeout(ws_close=10),
    )
    welcome = orjson.loads((await ws.receive(timeout=30)).data)
    assert welcome["type"] == "welcome", welcome
    return ws, time.perf_counter() - start


async def chatter(
    ws: aiohttp.ClientWebSocketResponse,
    session_id: str,
    count: int,
    acks: list[float],
    echoes: list[float],
) -> None:
    for _ in range(count):
        msg_id = uuid.uuid4().hex
        start = time.perf_counter()
        await ws.send_bytes(
            orjson.dumps(
                {"type": "chat", "id": msg_id, "session_id": session_id, "content": "ping"}
            )
        )
        acked = echoed = False
        while not (acked and echoed):
            frame = orjson.loads((await ws.receive(timeout=30)).data)
            if frame["type"] == "ack" and frame["id"] == msg_id:
                acks.append(time.perf_counter() - start)
                acked = True
            elif frame["type"] == "message" and frame["message"]["client_msg_id"] == msg_id:
                # Can precede the ack: the worker may publish before the node reads XADD's reply.
                echoes.append(time.perf_counter() - start)
                echoed = True


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", action="append", required=True, help="node WebSocket URL")
    parser.add_argument("--secret", required=True, help="FANOUT_JWT_SECRET of the cluster")
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--senders", type=int, default=100)
    parser.add_argument("--chats", type=int, default=10, help="chats per sender")
    parser.add_argument("--parallel", type=int, default=100, help="concurrent connects")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(
        resource.RLIMIT_NOFILE, (min(hard, max(soft, args.connections * 2 + 100)), hard)
    )
    run = uuid.uuid4().hex[:6]
    users = [f"bench-{run}-{i}" for i in range(args.connections // 2)]
    tokens = {u: mint_token(args.secret, u, ttl=3600) for u in users}
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    sockets: list[tuple[str, aiohttp.ClientWebSocketResponse]] = []
    connect_times: list[float] = []
    gate = asyncio.Semaphore(args.parallel)

    async def one(i: int) -> None:
        user = users[i // 2]
        async with gate:
            ws, took = await open_ws(http, args.url[i % len(args.url)], tokens[user], f"d{i % 2}")
        sockets.append((user, ws))
        connect_times.append(took)

    started = time.perf_counter()
    try:
        await asyncio.gather(*(one(i) for i in range(len(users) * 2)))
        wall = time.perf_counter() - started
        print(
            f"connected {len(sockets)} sockets in {wall:.2f} s "
            f"({len(sockets) / wall:.0f}/s, {args.parallel} at a time)"
        )
        print(summary("connect", connect_times))

        api = args.url[0].replace("ws://", "http://").replace("/ws", "/api/v1/sessions")
        senders = []
        for user, ws in sockets[: args.senders]:
            async with http.post(
                api, json={}, headers={"Authorization": f"Bearer {tokens[user]}"}
            ) as resp:
                senders.append((ws, (await resp.json())["id"]))
        acks: list[float] = []
        echoes: list[float] = []
        started = time.perf_counter()
        await asyncio.wait_for(
            asyncio.gather(*(chatter(ws, sid, args.chats, acks, echoes) for ws, sid in senders)),
            timeout=300,
        )
        wall = time.perf_counter() - started
        print(
            f"{len(echoes)} chats from {len(senders)} senders in {wall:.2f} s "
            f"({len(echoes) / wall:.0f} chats/s), {len(sockets)} sockets open"
        )
        print(summary("send->ack", acks))
        print(summary("send->message", echoes))
    finally:
        await asyncio.gather(*(ws.close() for _, ws in sockets), return_exceptions=True)
        await http.close()


if __name__ == "__main__":
    asyncio.run(main())
