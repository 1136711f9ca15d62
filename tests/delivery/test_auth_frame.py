"""The `auth` client frame (SPEC §4): a fresh token without reconnecting."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp

from tests.support.harness import Client, Cluster, Proc, is_type, token

SHORT = 2  # seconds a short-lived token lives


@asynccontextmanager
async def connect_with(node: Proc, jwt: str, device_id: str) -> AsyncIterator[Client]:
    http = aiohttp.ClientSession()
    try:
        ws = await http.ws_connect(node.ws_url, params={"device_id": device_id, "token": jwt})
    except BaseException:
        await http.close()
        raise
    client = Client(ws, http)
    try:
        client.welcome = await client.recv()
        assert client.welcome["type"] == "welcome"
        yield client
    finally:
        await client.close()


async def closed_with(client: Client, timeout: float) -> int | None:
    """Read until the node closes the socket; its close code."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = await client.ws.receive(timeout=deadline - time.monotonic())
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
            return client.ws.close_code
    raise TimeoutError("the socket stayed open")


async def test_a_fresh_token_keeps_the_socket_open_past_the_old_expiry(cluster: Cluster) -> None:
    node = await cluster.node()
    async with (
        connect_with(node, token("tia", ttl=SHORT), "t1") as renewed,
        connect_with(node, token("tia", ttl=SHORT), "t2") as left_alone,
    ):
        fresh = token("tia", ttl=3600)
        await renewed.send({"type": "auth", "token": fresh})
        answer = await renewed.until(is_type("auth"))
        assert answer["expires_at"] >= time.time() + 3000
        # The untouched socket is closed at its token's expiry; the renewed one is not.
        assert await closed_with(left_alone, SHORT + 3) == 1008
        await renewed.send({"type": "ping"})
        await renewed.until(is_type("pong"))
        assert not renewed.ws.closed


async def test_a_bad_token_is_refused_and_the_old_one_stays_in_force(cluster: Cluster) -> None:
    node = await cluster.node()
    async with connect_with(node, token("uma", ttl=SHORT), "u1") as client:
        await client.send({"type": "auth", "token": "not-a-jwt"})
        error = await client.until(is_type("error"))
        assert error["code"] == "BAD_TOKEN" and error["retry"] is False
        await client.send({"type": "auth", "token": token("uma", ttl=-10)})  # expired
        assert (await client.until(is_type("error")))["code"] == "BAD_TOKEN"
        await client.send({"type": "ping"})
        await client.until(is_type("pong"))  # still open
        assert await closed_with(client, SHORT + 3) == 1008  # ...until the old token expires


async def test_a_token_of_another_user_closes_the_socket(cluster: Cluster) -> None:
    node = await cluster.node()
    async with connect_with(node, token("val"), "v1") as client:
        await client.send({"type": "auth", "token": token("mallory")})
        assert await closed_with(client, 5) == 1008
