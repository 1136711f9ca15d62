"""Malformed and hostile WebSocket input gets SPEC §4's answer (issue 13, item 7)."""

from __future__ import annotations

import time

import aiohttp
import jwt
import orjson
import pytest

from tests.support.harness import SECRET, Cluster, Proc, connect, is_type
from tests.support.rawws import OP_PING, OP_PONG, OP_TEXT, client_frame, close_frame, open_raw

MAX_FRAME = 4096


@pytest.fixture
async def node(cluster: Cluster) -> Proc:
    return await cluster.node(FANOUT_MAX_FRAME=str(MAX_FRAME))


def _ping_text(size: int) -> bytes:
    """A `ping` frame's JSON padded to exactly `size` bytes."""
    bare = b'{"type":"ping","pad":""}'
    return bare[:-2] + b"x" * (size - len(bare)) + b'"}'


async def test_last_seq_that_is_not_ascii_digits_up_to_2_53_is_a_400(node: Proc) -> None:
    for bad in ("²", "①", "١٢", str(2**64), str(2**53 + 1), "-1", "+1", "1e3", " 1", "0x1", ""):
        raw = await open_raw(node, "lsq", last_seq=bad)
        assert raw.status == 400, (bad, raw.head)
        raw.abort()
    raw = await open_raw(node, "lsq", last_seq=str(2**53))
    assert raw.status == 101
    opcode, payload = await raw.recv()
    assert opcode == OP_TEXT and orjson.loads(payload)["type"] == "welcome"
    raw.abort()


async def test_a_sub_with_a_lone_surrogate_is_a_401(node: Proc) -> None:
    forged = jwt.encode({"sub": "ann\ud800", "exp": int(time.time()) + 60}, SECRET, "HS256")
    auth = {"Authorization": f"Bearer {forged}"}
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(node.ws_url, params={"device_id": "s1"}, headers=auth)
        assert refused.value.status == 401
        async with http.get(f"{node.url}/api/v1/sessions", headers=auth) as resp:
            assert resp.status == 401


async def test_a_frame_of_exactly_the_limit_is_taken_one_byte_more_closes_1009(node: Proc) -> None:
    async with connect(node, "lim", "l1") as lim:
        await lim.send(_ping_text(MAX_FRAME).decode())
        await lim.until(is_type("pong"), timeout=5)
        await lim.send(_ping_text(MAX_FRAME + 1).decode())
        msg = await lim.ws.receive(timeout=5)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert lim.ws.close_code == 1009


async def test_an_unmasked_client_frame_closes_1002_after_the_frames_before_it(
    node: Proc,
) -> None:
    raw = await open_raw(node, "unm")
    assert (await raw.recv())[0] == OP_TEXT  # welcome
    masked = client_frame(OP_PING, b"before")
    unmasked = client_frame(OP_TEXT, b'{"type":"ping"}', masked=False)
    # One write: the frame before the unmasked one is still read (its pong is written
    # at once), nothing after it is.
    await raw.send(masked + unmasked + client_frame(OP_PING, b"after"))
    assert await raw.recv() == (OP_PONG, b"before")
    assert await raw.close_code() == 1002
    raw.abort()


async def test_frames_in_the_same_segment_as_the_upgrade_request_are_answered(
    node: Proc,
) -> None:
    behind = client_frame(OP_TEXT, b'{"type":"ping"}') + client_frame(OP_PING, b"early")
    behind += client_frame(OP_TEXT, b'{"type":"ping"}')
    # In the request's own write, and in a write of their own before the answer (they
    # reach the node while it checks the token and claims the device).
    for way in ({"behind": behind}, {"then": behind}):
        raw = await open_raw(node, "seg", **way)
        assert raw.status == 101
        got = [await raw.recv() for _ in range(4)]
        texts = [orjson.loads(p)["type"] for op, p in got if op == OP_TEXT]
        assert texts == ["welcome", "pong", "pong"], way
        assert (OP_PONG, b"early") in got
        raw.abort()


async def test_a_binary_frame_gets_bad_request_and_the_socket_stays_open(node: Proc) -> None:
    async with connect(node, "bin", "b1") as client:
        await client.ws.send_bytes(b'{"type":"ping"}')
        error = await client.until(is_type("error"), timeout=5)
        assert error["code"] == "BAD_REQUEST"
        assert [f for f in client.frames if f["type"] == "pong"] == []
        await client.send({"type": "ping"})
        await client.until(is_type("pong"), timeout=5)


@pytest.mark.parametrize("code", [999, 1004, 1005, 1006, 1015, 2999, 5000, 65535])
async def test_a_close_code_no_peer_may_send_is_answered_1002(node: Proc, code: int) -> None:
    raw = await open_raw(node, f"cc{code}")
    assert (await raw.recv())[0] == OP_TEXT  # welcome
    await raw.send(close_frame(code))
    assert await raw.close_code() == 1002
    raw.abort()


@pytest.mark.parametrize("code", [1000, 1001, 1011, 1014, 3000, 4999])
async def test_a_valid_close_code_is_answered_1000(node: Proc, code: int) -> None:
    raw = await open_raw(node, f"ok{code}")
    assert (await raw.recv())[0] == OP_TEXT
    await raw.send(close_frame(code))
    assert await raw.close_code() == 1000
    raw.abort()
