"""A PING flood costs the node neither memory nor other users' latency (issue 13, item 1).

PINGs count toward FANOUT_RATE and the flooding rule like any frame; the pongs owed
count toward FANOUT_SEND_QUEUE_BYTES. Memory is read from /proc of the node under test.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.support.harness import Cluster, Proc, connect, is_type
from tests.support.rawws import OP_CLOSE, OP_PING, OP_PONG, RawSocket, client_frame, open_raw

MIB = 1024 * 1024


def rss(node: Proc) -> int:
    """The node's resident memory in bytes, from /proc."""
    for line in Path(f"/proc/{node.popen.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def metric(node: Proc, name: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(f"{node.url}/metrics") as resp:
        text = await resp.text()
    return next(
        s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name
    )


async def flood(raw: RawSocket, *, frames: int, payload: bytes, within: float) -> int:
    """Write up to `frames` PINGs (never reading) for at most `within` seconds; how many
    were written before the time ran out or the node ended the connection."""
    batch = client_frame(OP_PING, payload) * 500
    sent = 0
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(within):
            while sent < frames:
                await raw.send(batch)
                sent += 500
    return sent


async def read_to_end(raw: RawSocket, within: float) -> tuple[list[int], int | None]:
    """The opcodes the node sent until it ended the connection, and its close code
    (None: it ended without a readable close frame)."""
    opcodes: list[int] = []
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
        async with asyncio.timeout(within):
            while True:
                opcode, payload = await raw.recv(within)
                opcodes.append(opcode)
                if opcode == OP_CLOSE:
                    return opcodes, int.from_bytes(payload[:2], "big")
    return opcodes, None


async def test_pings_count_toward_the_rate_and_a_ping_flood_closes_1008(cluster: Cluster) -> None:
    node = await cluster.node()  # FANOUT_RATE 20, FANOUT_RATE_BURST 40
    raw = await open_raw(node, "pia")
    await raw.recv()  # welcome
    await raw.send(client_frame(OP_PING, b"p") * 3000)  # over 5 × 20/s × 10 s, at once
    opcodes, code = await read_to_end(raw, 5)
    raw.abort()
    pongs = opcodes.count(OP_PONG)
    assert 1 <= pongs <= 45, f"the burst is answered, the rest dropped: {pongs} pongs"
    assert code == 1008, f"flooding closes the socket: {opcodes[-3:]} {code}"


async def test_pongs_owed_to_a_peer_that_never_reads_count_toward_the_send_queue(
    cluster: Cluster,
) -> None:
    # No rate limit to speak of: only the send-queue bound stands between the flood
    # and the node's memory.
    node = await cluster.node(
        FANOUT_RATE="10000000", FANOUT_RATE_BURST="10000000", FANOUT_SEND_QUEUE_BYTES="65536"
    )
    raw = await open_raw(node, "pib", receive_buffer=4096)
    await raw.recv()  # welcome
    before = rss(node)
    sent = await flood(raw, frames=200_000, payload=b"x" * 125, within=8)
    grown = rss(node) - before
    raw.abort()
    assert sent >= 100_000, f"the flood was not sent: {sent} frames"
    assert await metric(node, "fanout_slow_consumer_closes_total") == 1
    assert grown < 8 * MIB, f"{sent} pings of 125 bytes grew the node by {grown / MIB:.1f} MiB"


async def test_ten_ping_flooders_that_never_read_are_closed_and_others_are_served(
    cluster: Cluster,
) -> None:
    node = await cluster.node()
    async with connect(node, "obs", "o1") as observer:
        flooders = [await open_raw(node, f"fl{i}", receive_buffer=4096) for i in range(10)]
        for raw in flooders:
            await raw.recv()  # welcome
        before = rss(node)
        flooding = [
            asyncio.create_task(flood(raw, frames=20_000, payload=b"x" * 125, within=4))
            for raw in flooders
        ]
        await asyncio.sleep(0.2)
        await observer.send({"type": "ping"})
        await observer.until(is_type("pong"), timeout=5)  # served while the flood runs
        await asyncio.gather(*flooding)
        grown = rss(node) - before
        for _ in range(50):
            if await metric(node, "websocket_connections_active") == 1:
                break
            await asyncio.sleep(0.1)
        assert await metric(node, "websocket_connections_active") == 1, "flooders not closed"
        assert grown < 8 * MIB, f"10 flooders grew the node by {grown / MIB:.1f} MiB"
        await observer.send({"type": "ping"})
        await observer.until(is_type("pong"), timeout=5)
        for raw in flooders:
            raw.abort()
