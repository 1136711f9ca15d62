"""One connection per (user, device): a second one replaces the first, on any node
(issue 13, item 2; SPEC §4), and the device limit and presence stay right."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from common.transport.keys import Keys
from node.presence import DEVICE_LEASES, DeviceRegistry
from tests.support.api import request
from tests.support.harness import Client, Cluster, Proc, is_type, open_client, token


async def _closed(client: Client, within: float = 5) -> tuple[int, str]:
    """Read until the node's close frame: its code and reason."""
    async with asyncio.timeout(within):
        while True:
            msg = await client.ws.receive()
            if msg.type == aiohttp.WSMsgType.CLOSE:
                return int(msg.data), str(msg.extra)
            if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                raise AssertionError(f"ended without a close frame: {msg}")


async def _presence(node: Proc, user: str) -> dict[str, Any]:
    status, body = await request(node, "GET", f"/api/v1/presence/{user}", auth=token(user))
    assert status == 200, body
    return body  # type: ignore[no-any-return]


async def _upgrade_status(node: Proc, user: str, device: str) -> int:
    async with aiohttp.ClientSession() as http:
        try:
            ws = await http.ws_connect(
                node.ws_url,
                params={"device_id": device},
                headers={"Authorization": f"Bearer {token(user)}"},
            )
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status
        await ws.close()
        return 101


async def test_a_second_connection_of_a_device_replaces_the_first_on_the_same_node(
    cluster: Cluster,
) -> None:
    node = await cluster.node()
    other = await open_client(node, "rey", "tablet")
    first = await open_client(node, "rey", "phone")
    await other.until(is_type("presence", device_id="phone", status="online"))
    second = await open_client(node, "rey", "phone")
    try:
        assert await _closed(first) == (1008, "replaced")
        devices = (await _presence(node, "rey"))["devices"]
        phones = [d for d in devices if d["device_id"] == "phone"]
        assert [d["connection_id"] for d in phones] == [second.welcome["connection_id"]]
        # The replaced socket's departure is not the device going offline.
        await second.send({"type": "ping"})
        await second.until(is_type("pong"))
        assert not [f for f in await other.drain(0.5) if f.get("status") == "offline"]
        # The newest closing is.
        await second.close()
        await other.until(is_type("presence", device_id="phone", status="offline"))
        assert [d["device_id"] for d in (await _presence(node, "rey"))["devices"]] == ["tablet"]
    finally:
        for client in (first, second, other):
            await client.close()


async def test_a_device_reused_across_nodes_holds_one_socket_and_counts_once(
    cluster: Cluster,
) -> None:
    nodes = [await cluster.node(), await cluster.node()]
    clients: list[Client] = []
    try:
        # Ten connections of one device, alternating between the nodes: each replaces
        # the one before, wherever it is.
        for i in range(10):
            clients.append(await open_client(nodes[i % 2], "sam", "phone"))
            if i:
                assert await _closed(clients[i - 1]) == (1008, "replaced"), i
        newest = clients[-1]
        await newest.send({"type": "ping"})
        await newest.until(is_type("pong"))
        devices = (await _presence(nodes[0], "sam"))["devices"]
        assert [(d["device_id"], d["connection_id"]) for d in devices] == [
            ("phone", newest.welcome["connection_id"])
        ]
        # The device counts once toward FANOUT_MAX_DEVICES (5): four more fit, not five.
        for n in range(4):
            clients.append(await open_client(nodes[n % 2], "sam", f"d{n}"))
        assert await _upgrade_status(nodes[1], "sam", "d4") == 429
        # Presence stays right when the newest closes: the device goes offline.
        watcher = clients[-1]
        await newest.close()
        await watcher.until(is_type("presence", device_id="phone", status="offline"))
        online = {d["device_id"] for d in (await _presence(nodes[1], "sam"))["devices"]}
        assert online == {"d0", "d1", "d2", "d3"}
    finally:
        for client in clients:
            await client.close()


async def test_a_replaced_socket_whose_command_was_lost_goes_at_its_device_refresh(
    cluster: Cluster, redis: aioredis.Redis, namespace: str
) -> None:
    # FANOUT_LEASE_TTL=0.5: the devices' own leases last DEVICE_LEASES × 0.5 s, and the
    # node checks its devices' holders every half of that.
    node = await cluster.node(FANOUT_LEASE_TTL="0.5")
    within = DEVICE_LEASES * 0.5 * 0.75 + 1
    client = await open_client(node, "ted", "phone")
    try:
        # Another node claims the device, and its `replace` command never arrives.
        elsewhere = DeviceRegistry(
            redis, Keys(namespace), node_id="elsewhere", lease_ttl=2, max_devices=5
        )
        assert (await elsewhere.claim("ted", "phone", "c-lost")).replaced is not None
        assert await _closed(client, within=within) == (1008, "replaced")
    finally:
        await client.close()
