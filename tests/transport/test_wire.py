"""The socket after its take-over from aiohttp (node/ws/wire.py): handshakes, order, release."""

from __future__ import annotations

import asyncio

import aiohttp

from tests.support.api import active_connections, request
from tests.support.harness import Cluster, connect, is_type, token


async def test_frames_sent_before_the_welcome_are_answered_after_it(cluster: Cluster) -> None:
    node = await cluster.node()
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(
            node.ws_url,
            params={"device_id": "w1"},
            headers={"Authorization": f"Bearer {token('wes')}"},
        )
        # Sent at once, while the node may still be joining the socket to its user.
        for _ in range(3):
            await ws.send_str('{"type": "ping"}')
        kinds = [(await ws.receive_json(timeout=5))["type"] for _ in range(4)]
        assert kinds == ["welcome", "pong", "pong", "pong"]
        await ws.close()


async def test_client_close_is_answered_and_the_socket_released(cluster: Cluster) -> None:
    node = await cluster.node()
    async with connect(node, "cal", "c1") as other, connect(node, "cal", "c2") as leaving:
        assert await active_connections(node) == 2
        await leaving.ws.close(code=1000)
        # aiohttp's client waits for the node's close frame: a clean close, not a cut.
        assert leaving.ws.close_code == 1000
        offline = await other.until(is_type("presence", status="offline"))
        assert offline["device_id"] == "c2"
        for _ in range(50):
            if await active_connections(node) == 1:
                break
            await asyncio.sleep(0.1)
        assert await active_connections(node) == 1


async def test_frames_over_64_kib_reach_the_client_whole(cluster: Cluster) -> None:
    # A frame this big takes the 64-bit length, and the two-part write (header, payload).
    node = await cluster.node(FANOUT_MAX_CONTENT="200000", FANOUT_MAX_FRAME="262144")
    async with connect(node, "bea", "b1") as bea:
        announce = {"level": "info", "title": "Big", "body": "x" * 100_000}
        status, body = await request(node, "POST", "/admin/broadcast", body=announce)
        assert status == 200, body
        frame = await bea.until(is_type("notification"))
        assert frame == {"type": "notification", **announce}
        await bea.send({"type": "ping"})
        await bea.until(is_type("pong"))
