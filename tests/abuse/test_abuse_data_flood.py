"""A stranger flooding a user's delivery log is held to FANOUT_PEER_RATE/FANOUT_PEER_BURST
per (sender, recipient), and the user's own conversations stay resumable (issue 13)."""

from __future__ import annotations

import time

import aiohttp
import pytest

from tests.support.harness import Client, Cluster, Proc, connect, create_session, is_type, token

BURST = 5
RATE = 1.0
FLOOD = 40


@pytest.fixture
async def node(cluster: Cluster) -> Proc:
    proc = await cluster.node(
        FANOUT_PEER_RATE=str(RATE),
        FANOUT_PEER_BURST=str(BURST),
        FANOUT_RATE="200",
        FANOUT_RATE_BURST="200",
        FANOUT_USER_LOG_MAXLEN="30",
    )
    await cluster.worker(FANOUT_USER_LOG_MAXLEN="30")
    return proc


async def _flood(client: Client, session_id: str, count: int) -> tuple[int, list[dict]]:  # type: ignore[type-arg]
    """Send `count` chats at once; how many were acked, and the errors of the others."""
    ids = [f"flood-{n}" for n in range(count)]
    for msg_id in ids:
        await client.chat(session_id, "spam", msg_id)
    acked, errors = 0, []
    answered: set[str] = set()
    while len(answered) < count:
        frame = await client.until(
            lambda f: f.get("type") in ("ack", "error") and f.get("id") in ids
        )
        answered.add(frame["id"])
        if frame["type"] == "ack":
            acked += 1
        else:
            errors.append(frame)
    return acked, errors


async def test_one_sender_is_held_to_the_peer_rate_per_recipient(node: Proc) -> None:
    flood_room = await create_session(node, "mal", ["vic"])
    alone = await create_session(node, "mal")
    async with connect(node, "mal", "m1") as mal:
        started = time.monotonic()
        acked, errors = await _flood(mal, flood_room, FLOOD)
        elapsed = time.monotonic() - started
        assert BURST <= acked <= BURST + RATE * elapsed + 1, (acked, elapsed)
        assert len(errors) == FLOOD - acked
        assert all(e["code"] == "RATE_LIMIT" and e["retry"] is True for e in errors)
        # Nobody else's log is at stake in a session of one: not limited.
        acked_alone, _ = await _flood(mal, alone, 2 * BURST)
        assert acked_alone == 2 * BURST
    # Over HTTP the same bucket answers 429.
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{node.url}/api/v1/sessions/{flood_room}/messages",
            json={"client_msg_id": "http-1", "content": "spam"},
            headers={"Authorization": f"Bearer {token('mal')}"},
        ) as resp,
    ):
        assert resp.status == 429, await resp.text()
        assert (await resp.json())["error"]["code"] == "RATE_LIMIT"
    # The bucket is per pair: another sender still reaches the same user.
    async with connect(node, "amy", "a1") as amy:
        other = await create_session(node, "amy", ["vic"])
        acked, _ = await _flood(amy, other, BURST)
        assert acked == BURST


async def test_a_users_own_conversation_stays_resumable_under_a_strangers_flood(
    node: Proc,
) -> None:
    own = await create_session(node, "vic", ["friend"])
    flood_room = await create_session(node, "mal", ["vic"])
    async with connect(node, "vic", "v1") as vic:
        last = vic.welcome["last_seq"]
    async with connect(node, "mal", "m1") as mal:
        acked, _ = await _flood(mal, flood_room, FLOOD)
        # Wait until the accepted ones (and their replies) are in vic's log too.
        while sum(f.get("type") == "message" for f in mal.frames) < 2 * acked:
            await mal.until(is_type("message"))
    async with connect(node, "friend", "f1") as friend:
        msg_id = await friend.chat(own, "are you there?")
        await friend.until(is_type("message", message__client_msg_id=msg_id))
        await friend.until(is_type("message", message__content="You said: are you there?"))
    async with connect(node, "vic", "v1", last_seq=str(last)) as vic:
        resumed = await vic.until(is_type("resumed"))
        assert resumed["complete"] is True, resumed
        texts = [f["message"]["content"] for f in vic.frames if f.get("type") == "message"]
        assert "are you there?" in texts
        assert texts.count("spam") <= BURST + 2  # (at 1/s, at most a couple refilled)
