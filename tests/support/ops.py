"""What the operations tests and the dashboard's browser tests share: their processes'
stats interval and lease TTL, reading /admin/stats and /metrics, polling until a
condition holds, a client chatting steadily, and a client that never reads."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.support.api import request
from tests.support.harness import Client, Proc, token

INTERVAL = "0.2"  # FANOUT_STATS_INTERVAL of these tests' processes
TTL = 2.0  # FANOUT_LEASE_TTL of the test environment (tests/conftest.py)


async def stats(node: Proc) -> dict[str, Any]:
    status, body = await request(node, "GET", "/admin/stats")
    assert status == 200, body
    assert isinstance(body, dict)
    return body


async def eventually(
    check: Callable[[], Awaitable[Any]], timeout: float = 10, what: str = "condition"
) -> Any:
    """Poll `check` until it returns something truthy (returned) or time runs out."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what} not reached in {timeout}s (last: {last!r})")


async def metrics(url: str) -> dict[str, float]:
    """Every sample of a /metrics page, keyed `name{label="v",...}`, parsed by prometheus."""
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


@contextlib.asynccontextmanager
async def chatting(client: Client, session_id: str, per_second: float = 8) -> AsyncIterator[None]:
    """Keep a client sending chats (below the rate limit) while the block runs."""

    async def loop() -> None:
        n = 0
        while True:
            try:
                await client.chat(session_id, f"load {n}")
            except (aiohttp.ClientError, ConnectionError):
                return  # its node went away (the tests kill nodes on purpose)
            n += 1
            await asyncio.sleep(1 / per_second)

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def stalled_client(port: int, user_id: str) -> socket.socket:
    """A WebSocket client that upgrades and then never reads (a tiny receive buffer)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        (
            f"GET /ws?device_id=stalled HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
            f"Authorization: Bearer {token(user_id)}\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock
