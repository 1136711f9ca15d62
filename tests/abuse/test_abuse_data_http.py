"""Abusive HTTP and data at the edge (issue 13, SPEC §3, §4, §6): metadata that nests too
deep or weighs too much, slow request heads and bodies, tokens that live too long."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import jwt
import pytest

from tests.support.harness import (
    SECRET,
    Cluster,
    Proc,
    connect,
    create_session,
    is_type,
    messages_in_db,
    token,
)

MAX_METADATA = 512


def nested(depth: int) -> dict[str, Any]:
    """An object nested `depth` levels: nested(1) == {"v": 1}."""
    value: Any = 1
    for _ in range(depth):
        value = {"v": value}
    assert isinstance(value, dict)
    return value


def _auth(user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(user)}"}


@pytest.fixture
async def node(cluster: Cluster) -> Proc:
    proc = await cluster.node(
        FANOUT_MAX_METADATA=str(MAX_METADATA),
        FANOUT_HTTP_HEAD_TIMEOUT="0.5",
        FANOUT_HTTP_BODY_TIMEOUT="0.5",
    )
    await cluster.worker()
    return proc


async def test_metadata_over_its_limits_is_refused_over_http(node: Proc) -> None:
    async with aiohttp.ClientSession(headers=_auth("mia")) as http:
        url = f"{node.url}/api/v1/sessions"
        for metadata in (nested(17), nested(300), {"blob": "x" * MAX_METADATA}):
            async with http.post(url, json={"metadata": metadata}) as resp:
                assert resp.status == 400, await resp.text()
                assert (await resp.json())["error"]["code"] == "BAD_REQUEST"
        async with http.post(url, json={"metadata": nested(16)}) as resp:
            assert resp.status == 201, await resp.text()
            session = await resp.json()
        one = f"{url}/{session['id']}"
        for metadata in (nested(17), nested(254), {"blob": "y" * MAX_METADATA}):
            async with http.patch(one, json={"metadata": metadata}) as resp:
                assert resp.status == 400, await resp.text()
                assert (await resp.json())["error"]["code"] == "BAD_REQUEST"
        async with http.get(one) as resp:
            assert resp.status == 200
            assert (await resp.json())["metadata"] == nested(16)


async def test_chat_metadata_over_its_limits_gets_an_error_and_is_never_stored(
    node: Proc, database_url: str
) -> None:
    session_id = await create_session(node, "max")
    async with connect(node, "max", "m1") as client:
        for n, metadata in enumerate((nested(17), nested(252), {"blob": "z" * MAX_METADATA})):
            frame_id = f"deep-{n}"
            await client.send(
                {
                    "type": "chat",
                    "id": frame_id,
                    "session_id": session_id,
                    "content": "hi",
                    "metadata": metadata,
                }
            )
            error = await client.until(is_type("error", id=frame_id))
            assert error["code"] == "BAD_REQUEST", error
            assert not any(f.get("type") == "ack" for f in client.frames)
        # A chat within the limits, behind them: the refused ones were never enqueued.
        await client.send(
            {
                "type": "chat",
                "id": "ok",
                "session_id": session_id,
                "content": "fine",
                "metadata": nested(16),
            }
        )
        await client.until(is_type("message", message__client_msg_id="ok"))
    rows = await messages_in_db(database_url, session_id)
    assert [r["client_msg_id"] for r in rows if r["role"] == "user"] == ["ok"]
    async with (
        aiohttp.ClientSession(headers=_auth("max")) as http,
        http.get(f"{node.url}/api/v1/sessions/{session_id}/messages") as resp,
    ):
        assert resp.status == 200


async def _raw(node: Proc, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    assert node.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    writer.write(data)
    await writer.drain()
    return reader, writer


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """Everything the node sent until it closed the connection (TimeoutError if it did not)."""
    received = b""
    async with asyncio.timeout(seconds):
        while chunk := await reader.read(4096):
            received += chunk
    return received


async def test_partial_heads_and_bodies_are_cut_and_healthz_keeps_answering(node: Proc) -> None:
    opened: list[asyncio.StreamWriter] = []

    async def slow(data: bytes) -> asyncio.StreamReader:
        reader, writer = await _raw(node, data)
        opened.append(writer)
        return reader

    body = (
        b"POST /api/v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Authorization: Bearer " + token("sue").encode() + b"\r\n"
        b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"agent":'
    )
    try:
        heads = [
            await slow(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: 1\r\n")
            for _ in range(20)
        ]
        heads += [await slow(b"") for _ in range(5)]
        bodies = [await slow(body) for _ in range(5)]
        started = time.monotonic()
        async with aiohttp.ClientSession() as http, http.get(f"{node.url}/healthz") as resp:
            assert resp.status == 200
        for reader in heads:
            assert await _closed_within(reader, 5) == b""
        for reader in bodies:
            answer = await _closed_within(reader, 5)
            assert answer.startswith(b"HTTP/1.1 408"), answer[:80]
        # Cut by the deadlines (0.5 s), not by anything slower.
        assert time.monotonic() - started < 5
    finally:
        for writer in opened:
            writer.close()
    async with aiohttp.ClientSession() as http, http.get(f"{node.url}/healthz") as resp:
        assert resp.status == 200


async def test_a_head_in_time_and_a_websocket_outlive_the_head_deadline(node: Proc) -> None:
    reader, writer = await _raw(node, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    await asyncio.sleep(0.2)
    writer.write(b"Connection: close\r\n\r\n")
    answer = await _closed_within(reader, 5)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:80]
    writer.close()
    async with connect(node, "wes", "w1") as client:
        await asyncio.sleep(1.2)  # over twice the head deadline
        await client.send({"type": "ping"})
        await client.until(is_type("pong"))


def _token(claims: dict[str, Any]) -> str:
    return jwt.encode({"sub": "tia", **claims}, SECRET, algorithm="HS256")


async def test_tokens_living_longer_than_the_maximum_are_refused(cluster: Cluster) -> None:
    node = await cluster.node(FANOUT_JWT_MAX_TTL="600")
    now = int(time.time())
    too_long = [
        _token({"exp": now + 3600}),  # expires too far ahead
        _token({"iat": now - 3000, "exp": now + 60}),  # exp - iat over the maximum
    ]
    fine = _token({"iat": now, "exp": now + 300})
    async with aiohttp.ClientSession() as http:
        for bad in too_long:
            headers = {"Authorization": f"Bearer {bad}"}
            async with http.get(f"{node.url}/api/v1/sessions", headers=headers) as resp:
                assert resp.status == 401, await resp.text()
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(f"{node.ws_url}?device_id=d1", headers=headers)
            assert refused.value.status == 401
        headers = {"Authorization": f"Bearer {fine}"}
        async with http.get(f"{node.url}/api/v1/sessions", headers=headers) as resp:
            assert resp.status == 200, await resp.text()


async def test_a_sub_that_is_not_text_is_a_401(node: Proc) -> None:
    lone_surrogate = jwt.encode(
        {"sub": "eve\ud800", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256"
    )
    async with aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {lone_surrogate}"}
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(f"{node.ws_url}?device_id=d1", headers=headers)
        assert refused.value.status == 401
        async with http.get(f"{node.url}/api/v1/sessions", headers=headers) as resp:
            assert resp.status == 401


async def test_the_workers_port_cuts_partial_heads_too(cluster: Cluster) -> None:
    worker = await cluster.worker(FANOUT_HTTP_HEAD_TIMEOUT="0.5")
    reader, writer = await _raw(worker, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    try:
        assert await _closed_within(reader, 5) == b""
    finally:
        writer.close()
    async with aiohttp.ClientSession() as http, http.get(f"{worker.url}/healthz") as resp:
        assert resp.status == 200
