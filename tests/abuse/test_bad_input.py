"""Bad input gets the SPEC's answer, and the connection and everything else keep working."""

from __future__ import annotations

import asyncio
import time
import uuid

import aiohttp
import jwt
import pytest

from common.client import websocket as wsclient
from tests.support.harness import (
    SECRET,
    Client,
    Cluster,
    Proc,
    connect,
    create_session,
    is_type,
    token,
)


@pytest.fixture
async def node(cluster: Cluster) -> Proc:
    proc = await cluster.node(
        FANOUT_MAX_FRAME="4096",
        FANOUT_MAX_CONTENT="1000",
        FANOUT_ALLOWED_ORIGINS="https://app.example",
    )
    await cluster.worker()
    return proc


async def _error(client: Client, frame: dict | str, code: str) -> dict:  # type: ignore[type-arg]
    await client.send(frame)
    got = await client.until(is_type("error"))
    assert got["code"] == code, got
    assert isinstance(got["message"], str) and got["message"]
    assert isinstance(got["retry"], bool)
    return got


async def _still_works(client: Client, session_id: str) -> None:
    await client.send({"type": "ping"})
    await client.until(is_type("pong"))
    msg_id = await client.chat(session_id, "still here")
    await client.until(is_type("ack", id=msg_id))
    await client.until(is_type("message", message__client_msg_id=msg_id))


async def test_bad_frames_get_errors_and_the_socket_stays_open(node: Proc) -> None:
    session_id = await create_session(node, "gina")
    async with connect(node, "gina", "g1") as gina:
        await _error(gina, "not json {", "BAD_REQUEST")
        await _error(gina, "[1, 2]", "BAD_REQUEST")
        await _error(gina, {"no": "type"}, "BAD_REQUEST")
        await _error(gina, {"type": "teleport"}, "UNKNOWN_TYPE")
        err = await _error(gina, {"type": "chat", "id": "x1", "content": "hi"}, "BAD_REQUEST")
        assert err["id"] == "x1"
        await _error(
            gina, {"type": "chat", "session_id": session_id, "content": "hi"}, "BAD_REQUEST"
        )
        await _error(
            gina,
            {"type": "chat", "id": "x2", "session_id": session_id, "content": 42},
            "BAD_REQUEST",
        )
        await _error(
            gina,
            {"type": "chat", "id": 7, "session_id": session_id, "content": "hi"},
            "BAD_REQUEST",
        )
        await _error(
            gina,
            {"type": "chat", "id": "x3", "session_id": "not-a-uuid", "content": "hi"},
            "BAD_REQUEST",
        )
        await _error(
            gina, {"type": "typing", "session_id": session_id, "is_typing": "yes"}, "BAD_REQUEST"
        )
        await _error(
            gina, {"type": "read", "session_id": session_id, "message_id": -1}, "BAD_REQUEST"
        )
        err = await _error(
            gina,
            {"type": "chat", "id": "x4", "session_id": session_id, "content": "é" * 501},
            "MSG_TOO_LARGE",
        )
        assert err["id"] == "x4"
        await _error(
            gina,
            {"type": "chat", "id": "x5", "session_id": str(uuid.uuid4()), "content": "hi"},
            "NOT_FOUND",
        )
        await _still_works(gina, session_id)


async def test_chat_to_a_session_of_others_is_forbidden(node: Proc, database_url: str) -> None:
    theirs = await create_session(node, "hank", ["ivy"])
    mine = await create_session(node, "jack")
    async with connect(node, "jack", "j1") as jack:
        err = await _error(
            jack,
            {"type": "chat", "id": "c1", "session_id": theirs, "content": "let me in"},
            "FORBIDDEN",
        )
        assert err["id"] == "c1" and err["retry"] is False
        await _error(jack, {"type": "typing", "session_id": theirs, "is_typing": True}, "FORBIDDEN")
        await _still_works(jack, mine)


async def test_oversized_frame_closes_1009(node: Proc) -> None:
    async with connect(node, "kim", "k1") as kim:
        await kim.send("x" * 5000)
        msg = await kim.ws.receive(timeout=5)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert kim.ws.close_code == 1009
    session_id = await create_session(node, "kim")
    async with connect(node, "kim", "k1") as again:  # the node itself is fine
        await _still_works(again, session_id)


async def test_a_text_frame_that_is_not_utf8_closes_1007(node: Proc) -> None:
    got: list[str] = []
    ws = await wsclient.connect(
        node.ws_url,
        got.append,
        params={"device_id": "u1"},
        headers={"Authorization": f"Bearer {token('uli')}"},
    )
    async with asyncio.timeout(5):
        while not got:  # the welcome
            await asyncio.sleep(0.01)
        ws.send_text(b'{"type":"ping","x":"\xff\xfe"}')  # bytes no UTF-8 decoder takes
        assert await ws.wait_closed() == 1007
    session_id = await create_session(node, "uli")
    async with connect(node, "uli", "u1") as again:  # the node itself is fine
        await _still_works(again, session_id)


def _forge(claims: dict, key: str = SECRET, alg: str = "HS256") -> str:  # type: ignore[type-arg]
    return jwt.encode(claims, key, algorithm=alg)


async def _upgrade_status(node: Proc, headers: dict[str, str], device: str = "d1") -> int:
    async with aiohttp.ClientSession() as http:
        try:
            ws = await http.ws_connect(node.ws_url, params={"device_id": device}, headers=headers)
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status
        await ws.close()
        return 101


async def test_bad_tokens_are_refused_before_the_upgrade(node: Proc) -> None:
    now = int(time.time())
    none_alg = jwt.encode({"sub": "mallory", "exp": now + 60}, key="", algorithm="none")
    cases = {
        "missing": {},
        "garbage": {"Authorization": "Bearer not.a.jwt"},
        "expired": {"Authorization": f"Bearer {_forge({'sub': 'm', 'exp': now - 10})}"},
        "no exp": {"Authorization": f"Bearer {_forge({'sub': 'm'})}"},
        "wrong key": {
            "Authorization": "Bearer " + _forge({"sub": "m", "exp": now + 60}, key="x" * 40)
        },
        "alg none": {"Authorization": f"Bearer {none_alg}"},
        "NUL in sub": {"Authorization": "Bearer " + _forge({"sub": "m\x00", "exp": now + 60})},
    }
    for name, headers in cases.items():
        assert await _upgrade_status(node, headers) == 401, name
    good = {"Authorization": f"Bearer {token('mallory')}"}
    assert await _upgrade_status(node, good) == 101
    # Browsers pass the token in the query string.
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(node.ws_url, params={"device_id": "b", "token": token("nia")})
        assert (await ws.receive_json(timeout=5))["type"] == "welcome"
        await ws.close()


async def test_origin_and_device_checks(node: Proc) -> None:
    auth = {"Authorization": f"Bearer {token('olga')}"}
    assert await _upgrade_status(node, {**auth, "Origin": "https://evil.example"}) == 403
    assert await _upgrade_status(node, {**auth, "Origin": "https://app.example"}) == 101
    assert await _upgrade_status(node, auth) == 101  # no Origin: not a browser
    assert await _upgrade_status(node, auth, device="bad device!") == 400


async def test_sixth_device_is_refused_429(node: Proc) -> None:
    clients = []
    try:
        for i in range(5):
            clients.append(await _open(node, "pat", f"p{i}"))
        auth = {"Authorization": f"Bearer {token('pat')}"}
        assert await _upgrade_status(node, auth, device="p5") == 429
        # A device that reconnects is not a new device.
        assert await _upgrade_status(node, auth, device="p0") == 101
        await clients.pop().close()
        assert await _upgrade_status(node, auth, device="p5") == 101
    finally:
        for client in clients:
            await client.close()


async def _open(node: Proc, user: str, device: str) -> Client:
    from tests.support.harness import open_client

    return await open_client(node, user, device)


async def test_bad_session_requests_get_400(node: Proc) -> None:
    auth = {"Authorization": f"Bearer {token('quinn')}"}
    async with aiohttp.ClientSession() as http:
        for body in (
            b"nope",
            b"[]",
            b'{"participants": "bob"}',
            b'{"agent": "robot"}',
            b'{"ttl": -5}',
            b'{"metadata": 3}',
        ):
            async with http.post(f"{node.url}/api/v1/sessions", data=body, headers=auth) as r:
                assert r.status == 400, body
                assert (await r.json())["error"]["code"] == "BAD_REQUEST"
        async with http.post(f"{node.url}/api/v1/sessions", json={}) as r:
            assert r.status == 401
