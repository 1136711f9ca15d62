"""common/client/websocket.py against a real aiohttp WebSocket server over loopback."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer

from common.client import websocket as wsclient
from common.client.fanout import FanoutClient

Serve = Callable[[web.Application], Awaitable[TestServer]]


@pytest.fixture
def seen() -> dict[str, Any]:
    return {}


@pytest.fixture
async def server(aiohttp_server: Serve, seen: dict[str, Any]) -> TestServer:
    async def handler(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != "Bearer good":
            raise web.HTTPUnauthorized()
        seen["query"] = dict(request.query)
        ws = web.WebSocketResponse(autoping=False)
        await ws.prepare(request)
        await ws.send_str("hello")
        await ws.ping(b"are-you-there")
        async for msg in ws:
            if msg.type == WSMsgType.PONG:
                seen["pong"] = msg.data
                await ws.send_str("x" * 100_000)
            elif msg.type == WSMsgType.TEXT:
                if msg.data == "bye":
                    await ws.close(code=4001, message=b"as asked")
                else:
                    await ws.send_str(f"echo:{msg.data}")
        seen["close_code"] = ws.close_code
        return ws

    app = web.Application()
    app.router.add_get("/ws", handler)
    return await aiohttp_server(app)


def url(server: TestServer, query: str = "") -> str:
    return f"ws://127.0.0.1:{server.port}/ws{query}"


async def test_round_trip_ping_and_a_client_close(server: TestServer, seen: dict[str, Any]) -> None:
    got: list[str] = []
    ws = await wsclient.connect(
        url(server, "?a=1"),
        got.append,
        params={"device_id": "d 1"},
        headers={"Authorization": "Bearer good"},
    )
    ws.send_text("héllo".encode())
    async with asyncio.timeout(5):
        while len(got) < 3:
            await asyncio.sleep(0.01)
    assert got == ["hello", "x" * 100_000, "echo:héllo"]
    assert seen["pong"] == b"are-you-there"
    assert seen["query"] == {"a": "1", "device_id": "d 1"}
    assert await ws.close() == 1000
    async with asyncio.timeout(5):
        while "close_code" not in seen:
            await asyncio.sleep(0.01)
    assert seen["close_code"] == 1000


async def test_a_server_close_code_reaches_the_client(server: TestServer) -> None:
    ws = await wsclient.connect(
        url(server), lambda t: None, headers={"Authorization": "Bearer good"}
    )
    ws.send_text(b"bye")
    async with asyncio.timeout(5):
        assert await ws.wait_closed() == 4001


async def test_a_refused_upgrade_raises_its_status(server: TestServer) -> None:
    with pytest.raises(wsclient.HandshakeError) as refused:
        await wsclient.connect(url(server), lambda t: None, headers={"Authorization": "Bearer no"})
    assert refused.value.status == 401


async def test_nothing_listening_is_refused_and_a_silent_server_times_out() -> None:
    with pytest.raises(ConnectionRefusedError):
        await wsclient.connect("ws://127.0.0.1:9/ws", lambda t: None)
    held: list[asyncio.StreamWriter] = []
    silent = await asyncio.start_server(lambda r, w: held.append(w), "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    try:
        with pytest.raises(TimeoutError):
            await wsclient.connect(f"ws://127.0.0.1:{port}/ws", lambda t: None, within=0.2)
    finally:
        for writer in held:
            writer.close()
        silent.close()
        await silent.wait_closed()


def test_only_ws_urls_are_taken() -> None:
    with pytest.raises(ValueError, match="ws://"):
        asyncio.run(wsclient.connect("http://127.0.0.1/ws", lambda t: None))


async def test_fanout_client_retries_a_429_and_gives_up_on_a_401(aiohttp_server: Serve) -> None:
    async def full(request: web.Request) -> web.StreamResponse:
        raise web.HTTPTooManyRequests()  # the user's devices are all connected

    async def refused(request: web.Request) -> web.StreamResponse:
        raise web.HTTPUnauthorized()

    app = web.Application()
    app.router.add_get("/full", full)
    app.router.add_get("/refused", refused)
    server = await aiohttp_server(app)
    base = f"ws://127.0.0.1:{server.port}"
    async with FanoutClient([f"{base}/full"], "t", "d1", backoff=(0.01, 0.02)) as busy:
        await asyncio.sleep(0.3)
        assert busy.stats.failed_attempts >= 3 and busy.fatal is None, "retried, not fatal"
    async with FanoutClient([f"{base}/refused"], "t", "d1", backoff=(0.01, 0.02)) as bad:
        with pytest.raises(ConnectionError, match="refused 401"):
            await bad.wait_connected(5)
        assert bad.stats.failed_attempts == 0
