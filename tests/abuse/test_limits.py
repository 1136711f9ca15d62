"""Per-connection limits of SPEC §4: rate limit, flooding, token expiry, heartbeat."""

from __future__ import annotations

import asyncio

import aiohttp

from tests.support.api import active_connections
from tests.support.harness import Cluster, connect, is_type, token
from tests.support.rawws import OP_TEXT, client_frame, open_raw


async def _closed_with(client_ws: aiohttp.ClientWebSocketResponse, within: float) -> int | None:
    """Read until the server closes; its close code."""
    async with asyncio.timeout(within):
        while True:
            msg = await client_ws.receive()
            if msg.type in (
                aiohttp.WSMsgType.CLOSE,
                aiohttp.WSMsgType.CLOSED,
                aiohttp.WSMsgType.CLOSING,
            ):
                return client_ws.close_code


async def test_rate_limit_drops_frames_with_one_error_per_second(cluster: Cluster) -> None:
    node = await cluster.node(FANOUT_RATE="5", FANOUT_RATE_BURST="5")
    async with connect(node, "rae", "r1") as rae:
        for _ in range(20):
            await rae.send({"type": "ping"})
        frames = await rae.drain(0.5)
        pongs = [f for f in frames if f["type"] == "pong"]
        errors = [f for f in frames if f["type"] == "error"]
        assert 5 <= len(pongs) <= 7, "the burst passes, the rest is dropped"
        assert [e["code"] for e in errors] == ["RATE_LIMIT"], "one error, not one per frame"
        assert errors[0]["retry"] is True
        await asyncio.sleep(1.0)
        await rae.send({"type": "ping"})
        await rae.until(is_type("pong"))  # the connection stays open


async def test_flooding_closes_1008(cluster: Cluster) -> None:
    node = await cluster.node(FANOUT_RATE="1", FANOUT_RATE_BURST="1")
    raw = await open_raw(node, "flo", "f1")
    try:
        assert raw.status == 101
        await raw.recv()  # welcome
        # Over 5 × the rate × 10 s, in one write: the node closes after its 1008 without
        # waiting for our reply, so frames sent one by one could fail on our side first.
        await raw.send(client_frame(OP_TEXT, b'{"type": "ping"}') * 80)
        assert await raw.close_code(5) == 1008
    finally:
        raw.abort()


async def test_expired_token_closes_1008(cluster: Cluster) -> None:
    node = await cluster.node()
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(
            node.ws_url,
            params={"device_id": "e1"},
            headers={"Authorization": f"Bearer {token('eve', ttl=2)}"},
        )
        assert (await ws.receive_json(timeout=5))["type"] == "welcome"
        assert await _closed_with(ws, 6) == 1008


async def test_silent_peer_is_closed_after_the_heartbeat(cluster: Cluster) -> None:
    node = await cluster.node(FANOUT_HEARTBEAT="0.5")
    async with aiohttp.ClientSession() as http:
        # No autoping and no reads: the node's pings go unanswered.
        ws = await http.ws_connect(
            node.ws_url,
            params={"device_id": "s1"},
            autoping=False,
            headers={"Authorization": f"Bearer {token('sid')}"},
        )
        assert await active_connections(node) == 1
        for _ in range(50):
            if await active_connections(node) == 0:
                break
            await asyncio.sleep(0.1)
        assert await active_connections(node) == 0, "a peer silent past the heartbeat is closed"
        await ws.close()
