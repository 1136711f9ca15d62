"""Sessions end to end: a human agent takes over and hands back, history pages while
messages arrive, and presence right after a node dies."""

from __future__ import annotations

import asyncio
import time

from tests.support.api import call, patch
from tests.support.harness import (
    Client,
    Cluster,
    connect,
    create_session,
    is_type,
    messages_in_db,
    open_client,
)


def _assistant_after(client: Client, message_id: int) -> list[dict]:  # type: ignore[type-arg]
    return [
        f
        for f in client.frames
        if f["type"] == "message"
        and f["message"]["role"] == "assistant"
        and f["message"]["id"] > message_id
    ]


async def test_human_hand_off_end_to_end(cluster: Cluster, database_url: str) -> None:
    node1, node2 = await asyncio.gather(cluster.node(), cluster.node())
    await cluster.worker()
    session_id = await create_session(node1, "hana")
    async with (
        connect(node1, "hana", "h1") as hana,
        connect(node2, "ava", "a1") as ava1,
        connect(node2, "ava", "a2") as ava2,
    ):
        await hana.chat(session_id, "hello bot")
        await hana.until(is_type("message", message__content="You said: hello bot"))

        code, body = await patch(node1, session_id, "hana", agent="human")
        assert code == 200 and body["agent"] == "human"
        await hana.until(is_type("session", session_id=session_id, agent="human"))

        # An agent joins (the id comes from a support queue); both devices hear of it.
        code, body = await call(
            node2,
            "POST",
            f"/api/v1/sessions/{session_id}/participants",
            "ava",
            roles=["agent"],
            json={"user_id": "ava"},
        )
        assert code == 200 and body["participants"] == ["hana", "ava"]
        for device in (ava1, ava2):
            await device.until(is_type("session", session_id=session_id, agent="human"))

        # With agent=human the user's message reaches the agent and nobody answers for her.
        msg = await hana.chat(session_id, "I want a person")
        for device in (hana, ava1, ava2):
            got = await device.until(is_type("message", message__client_msg_id=msg))
            assert got["message"]["role"] == "user"
        asked = got["message"]["id"]
        await asyncio.sleep(1.0)
        for device in (hana, ava1, ava2):
            await device.drain(0.2)
            assert _assistant_after(device, asked) == [], "no assistant reply with agent=human"

        # The agent answers from one device: the user and the agent's other device see it.
        reply = await ava1.chat(session_id, "Hi, I'm Ava. How can I help?")
        for device in (hana, ava1, ava2):
            got = await device.until(is_type("message", message__client_msg_id=reply))
            assert got["message"]["role"] == "agent" and got["message"]["user_id"] == "ava"

        # Back to the assistant: it answers the user again (and never the agent).
        code, body = await patch(node2, session_id, "ava", agent="ai")
        assert code == 200 and body["agent"] == "ai"
        await hana.until(is_type("session", session_id=session_id, agent="ai"))
        await hana.chat(session_id, "thanks")
        for device in (hana, ava1, ava2):
            await device.until(is_type("message", message__content="You said: thanks"))

    rows = await messages_in_db(database_url, session_id)
    assert [(r["role"], r["user_id"]) for r in rows] == [
        ("user", "hana"),
        ("assistant", "assistant"),
        ("user", "hana"),
        ("agent", "ava"),
        ("user", "hana"),
        ("assistant", "assistant"),
    ]


async def _stored(database_url: str, session_id: str, count: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while len(await messages_in_db(database_url, session_id)) < count:
        assert time.monotonic() < deadline, f"fewer than {count} messages stored"
        await asyncio.sleep(0.1)


async def test_history_pages_hold_every_message_once_while_new_ones_arrive(
    cluster: Cluster, database_url: str
) -> None:
    node = await cluster.node(FANOUT_RATE="1000", FANOUT_RATE_BURST="1000")
    await cluster.worker()
    # agent=human: no assistant replies, so the count of messages is exact.
    session_id = await create_session(node, "hugo", agent="human")
    async with connect(node, "hugo", "h1") as h1, connect(node, "hugo", "h2") as h2:
        for i in range(120):
            await h1.chat(session_id, f"old {i}")
        await _stored(database_url, session_id, 120)

        async def keep_writing() -> None:
            for i in range(60):
                await h2.chat(session_id, f"new {i}")
                await asyncio.sleep(0.01)

        writer = asyncio.create_task(keep_writing())
        pages: list[list[int]] = []
        params = {"limit": "7"}
        path = f"/api/v1/sessions/{session_id}/messages"
        while True:
            code, page = await call(node, "GET", path, "hugo", params=params)
            assert code == 200 and 0 < len(page["items"]) <= 7
            pages.append([m["id"] for m in page["items"]])
            if page["next"] is None:
                break
            params = {"limit": "7", "before": page["next"]}
            await asyncio.sleep(0.02)  # let new messages land between pages
        await writer
        await _stored(database_url, session_id, 180)

    shown = [i for page in pages for i in page]
    assert len(shown) == len(set(shown)), "a message appeared on two pages"
    assert shown == sorted(shown, reverse=True), "newest first, across pages"
    stored = [r["id"] for r in await messages_in_db(database_url, session_id)]
    assert set(shown) == {i for i in stored if i <= shown[0]}, "every message up to page 1"
    assert len(shown) >= 120
    code, first = await call(node, "GET", path, "hugo", params={"limit": "1"})
    item = first["items"][0]
    assert item["id"] == max(stored) and item["role"] == "user" and item["content"] == "new 59"
    assert first["next"] == str(item["id"])


async def test_presence_drops_a_killed_nodes_devices_within_the_lease(cluster: Cluster) -> None:
    node1, node2 = await asyncio.gather(cluster.node(), cluster.node())

    async def devices() -> set[str]:
        code, body = await call(node2, "GET", "/api/v1/presence/pia", "pia")
        assert code == 200
        return {d["device_id"] for d in body["devices"]}

    async with connect(node2, "pia", "p2") as p2:
        doomed = await open_client(node1, "pia", "p1")
        try:
            assert await devices() == {"p1", "p2"}
            node1.kill()
            killed = time.monotonic()
            while await devices() != {"p2"}:
                assert time.monotonic() - killed < 2 + 1.0, "a ghost outlived the lease (2 s)"
                await asyncio.sleep(0.1)
        finally:
            await doomed.close()
        code, body = await call(node2, "GET", "/api/v1/presence/pia", "pia")
        assert (
            code == 200 and body["online"] is True and body["devices"][0]["node_id"] != node1.name
        )
        await p2.send({"type": "ping"})
        await p2.until(is_type("pong"))
    deadline = time.monotonic() + 1.0  # a clean disconnect leaves at once, not by lease
    while await devices():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
