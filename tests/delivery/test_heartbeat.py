"""The node's own heartbeat (node.ws.timers.Heartbeat): a peer that answers pings stays."""

from __future__ import annotations

import asyncio

import aiohttp

from tests.support.harness import Cluster, token


async def test_a_peer_that_answers_pings_stays_and_gets_pongs(cluster: Cluster) -> None:
    node = await cluster.node(FANOUT_HEARTBEAT="0.5")
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(
            node.ws_url,
            params={"device_id": "h1"},
            autoping=False,  # to see the node's pings; answered by hand below
            headers={"Authorization": f"Bearer {token('hal')}"},
        )
        assert (await ws.receive_json(timeout=5))["type"] == "welcome"
        pings = 0
        loop = asyncio.get_running_loop()
        until = loop.time() + 2.5  # five heartbeats: silent, it would have been cut
        while loop.time() < until:
            try:
                msg = await ws.receive(timeout=until - loop.time())
            except TimeoutError:
                break
            assert msg.type == aiohttp.WSMsgType.PING, msg
            pings += 1
            await ws.pong(msg.data)
        assert pings >= 2, "the node pings a silent peer every heartbeat"
        await ws.ping(b"hi")
        msg = await ws.receive(timeout=2)
        while msg.type == aiohttp.WSMsgType.PING:
            msg = await ws.receive(timeout=2)
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.PONG, b"hi")
        assert not ws.closed
        await ws.close()
