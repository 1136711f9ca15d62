"""The admin API (issue 6): role checks, connections, disconnect, notify and broadcast."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from tests.support.api import request
from tests.support.harness import Client, Cluster, Proc, connect, is_type, token
from tests.support.ops import INTERVAL, TTL, eventually

ROUTES = [
    ("GET", "/admin/stats", None),
    ("GET", "/admin/history", None),
    ("GET", "/admin/connections", None),
    ("POST", "/admin/users/someone/disconnect", None),
    ("POST", "/admin/notify", {"user_id": "someone", "level": "info", "title": "t", "body": "b"}),
    ("POST", "/admin/broadcast", {"level": "info", "title": "t", "body": "b"}),
]


async def two_nodes(cluster: Cluster) -> tuple[Proc, Proc]:
    return await asyncio.gather(
        cluster.node("node-1", FANOUT_STATS_INTERVAL=INTERVAL),
        cluster.node("node-2", FANOUT_STATS_INTERVAL=INTERVAL),
    )


async def test_admin_api_is_for_admins_only(cluster: Cluster) -> None:
    node = await cluster.node(FANOUT_STATS_INTERVAL=INTERVAL)
    for method, path, body in ROUTES:
        status, reply = await request(node, method, path, auth=None, body=body)
        assert status == 401, (path, reply)
        assert reply["error"]["code"] == "UNAUTHORIZED"
        status, reply = await request(node, method, path, auth="not-a-jwt", body=body)
        assert status == 401, (path, reply)
        for roles in (None, ["agent"]):
            status, reply = await request(
                node, method, path, auth=token("mallory", roles=roles), body=body
            )
            assert status == 403, (path, roles, reply)
            assert reply["error"]["code"] == "FORBIDDEN"
        status, reply = await request(node, method, path, body=body)
        assert status == 200, (path, reply)


@pytest.mark.parametrize(
    "body",
    [
        {"user_id": "u", "level": "loud", "title": "t", "body": "b"},
        {"user_id": "u", "level": "info", "title": "", "body": "b"},
        {"user_id": "u", "level": "info", "title": "t", "body": 5},
        {"user_id": "", "level": "info", "title": "t", "body": "b"},
        {"level": "info", "title": "t" * 201, "body": "b"},
        {"user_id": "u", "title": "t", "body": "b", "id": ""},
    ],
)
async def test_bad_notifications_are_400(cluster: Cluster, body: dict[str, object]) -> None:
    node = await cluster.node()
    status, reply = await request(node, "POST", "/admin/notify", body=body)
    assert status == 400, reply
    assert reply["error"]["code"] == "BAD_REQUEST"


async def test_connections_are_listed_across_nodes(cluster: Cluster) -> None:
    node1, node2 = await two_nodes(cluster)
    async with (
        connect(node1, "uma", "u1") as u1,
        connect(node2, "uma", "u2") as u2,
        connect(node2, "vic", "v1"),
    ):

        async def listed() -> dict[str, object] | None:
            status, body = await request(node1, "GET", "/admin/connections")
            assert status == 200, body
            return body if body["total"] == 3 else None

        body = await eventually(listed, what="three connections listed")
        got = {(c["user_id"], c["device_id"], c["node_id"]) for c in body["items"]}
        assert got == {("uma", "u1", "node-1"), ("uma", "u2", "node-2"), ("vic", "v1", "node-2")}
        conn_ids = {c["connection_id"] for c in body["items"]}
        assert u1.welcome["connection_id"] in conn_ids
        assert all(c["connected_at"] > 0 for c in body["items"])

        status, body = await request(node2, "GET", "/admin/connections?user_id=uma")
        assert status == 200, body
        assert body["total"] == 2
        assert {(c["device_id"], c["node_id"]) for c in body["items"]} == {
            ("u1", "node-1"),
            ("u2", "node-2"),
        }
        assert {c["connection_id"] for c in body["items"]} == {
            u1.welcome["connection_id"],
            u2.welcome["connection_id"],
        }
        status, body = await request(node2, "GET", "/admin/connections?limit=1")
        assert status == 200 and len(body["items"]) == 1 and body["truncated"] is True


async def test_the_stats_follow_a_leave_and_stay_while_nothing_changes(cluster: Cluster) -> None:
    # The stats writer skips its walks over the connections while the hub is unchanged
    # (node/stats.py): a leave must still reach the connection list, the node's
    # connection count and the user count, and an idle node's entries must not expire.
    node = await cluster.node(FANOUT_STATS_INTERVAL=INTERVAL)

    async def view() -> tuple[int, int, int]:
        status, listed = await request(node, "GET", "/admin/connections")
        assert status == 200, listed
        status, stats = await request(node, "GET", "/admin/stats")
        assert status == 200, stats
        totals = stats["totals"]
        return listed["total"], totals["connections"], totals["users"]

    async with connect(node, "yara", "y1"), connect(node, "zeno", "z1"):
        async with connect(node, "zeno", "z2"):
            await eventually(lambda: _is(view, (3, 3, 2)), what="three connections, two users")
        await eventually(lambda: _is(view, (2, 2, 2)), what="the leave counted")
        await asyncio.sleep(2 * TTL)  # no change for two lease TTLs: refreshed, not expired
        assert await view() == (2, 2, 2)
    await eventually(lambda: _is(view, (0, 0, 0)), what="every leave counted")


async def _is(view: Callable[[], Awaitable[tuple[int, int, int]]], want: tuple[int, ...]) -> bool:
    return await view() == want


async def test_disconnect_closes_the_users_sockets_on_every_node(cluster: Cluster) -> None:
    node1, node2 = await two_nodes(cluster)
    async with (
        connect(node1, "walt", "w1") as w1,
        connect(node2, "walt", "w2") as w2,
        connect(node2, "xena", "x1") as x1,
    ):
        status, body = await request(node1, "POST", "/admin/users/walt/disconnect")
        assert status == 200, body
        assert body == {"user_id": "walt", "devices": 2, "nodes": 2}
        for client in (w1, w2):
            assert await _close_frame(client) == (1008, "disconnected by an admin")
        await x1.send({"type": "ping"})
        await x1.until(is_type("pong"))  # other users stay connected


async def test_notify_is_logged_with_seq_on_every_device_and_resumable(cluster: Cluster) -> None:
    node1, node2 = await two_nodes(cluster)
    async with connect(node1, "yuri", "y1") as y1, connect(node2, "yuri", "y2") as y2:
        note = {"user_id": "yuri", "level": "warning", "title": "Heads up", "body": "maintenance"}
        status, body = await request(node2, "POST", "/admin/notify", body={**note, "id": "n-1"})
        assert status == 200, body
        seq = body["seq"]
        assert seq == y1.welcome["last_seq"] + 1
        for client in (y1, y2):
            frame = await client.until(is_type("notification"))
            assert frame == {
                "seq": seq,
                "type": "notification",
                "level": "warning",
                "title": "Heads up",
                "body": "maintenance",
            }
        # A retry with the same id keeps its seq and notifies nobody twice.
        status, again = await request(node1, "POST", "/admin/notify", body={**note, "id": "n-1"})
        assert status == 200 and again["seq"] == seq
        assert not [f for f in await y1.drain() if f["type"] == "notification"]
    async with connect(node2, "yuri", "y3", last_seq=str(seq - 1)) as y3:
        replayed = await y3.until(is_type("notification"))
        assert replayed["seq"] == seq and replayed["title"] == "Heads up"
        resumed = await y3.until(is_type("resumed"))
        assert resumed["complete"] is True


async def test_broadcast_reaches_every_device_on_every_node_without_seq(cluster: Cluster) -> None:
    node1, node2 = await two_nodes(cluster)
    async with (
        connect(node1, "zoe", "z1") as z1,
        connect(node2, "zoe", "z2") as z2,
        connect(node2, "abe", "a1") as a1,
    ):
        announce = {"level": "info", "title": "Release", "body": "v2 is out"}
        status, body = await request(node1, "POST", "/admin/broadcast", body=announce)
        assert status == 200, body
        assert body == {"nodes": 2}
        for client in (z1, z2, a1):
            frame = await client.until(is_type("notification"))
            assert frame == {"type": "notification", **announce}, "no seq on a broadcast"
        samples = await _text(node2.url + "/metrics")
        assert 'websocket_messages_total{direction="out",type="broadcast"} 2.0' in samples


async def _text(url: str) -> str:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return await resp.text()


async def _close_frame(client: Client) -> tuple[int, str]:
    """Read to the server's close frame: its code and reason."""
    while True:
        msg = await client.ws.receive(timeout=5)
        if msg.type == aiohttp.WSMsgType.CLOSE:
            return int(msg.data), str(msg.extra)
        assert msg.type == aiohttp.WSMsgType.TEXT, msg
