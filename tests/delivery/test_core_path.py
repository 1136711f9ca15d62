"""A chat from one device reaches every device of every participant, across nodes (issue 2)."""

from __future__ import annotations

import asyncio

import pytest

from tests.support.harness import Client, Cluster, connect, create_session, is_type, messages_in_db


async def _reply_reaches(client: Client, session_id: str, content: str) -> list[dict]:  # type: ignore[type-arg]
    """The assistant's deltas, then its final message, as this client saw them."""
    final = await client.until(is_type("message", message__role="assistant"))
    deltas = [
        f
        for f in client.frames
        if f["type"] == "message_delta" and f["message_id"] == final["message"]["id"]
    ]
    assert deltas, "no message_delta before the final assistant message"
    assert "".join(d["delta"] for d in deltas) == final["message"]["content"]
    assert final["message"]["content"] == f"You said: {content}"
    assert client.frames.index(deltas[-1]) < client.frames.index(final)
    return deltas


@pytest.mark.parametrize("mode", ["user", "pattern"])
async def test_chat_reaches_every_device_across_nodes(
    cluster: Cluster, database_url: str, mode: str
) -> None:
    node1, node2 = await asyncio.gather(
        cluster.node("node-1", FANOUT_SUBSCRIPTION_MODE=mode),
        cluster.node("node-2", FANOUT_SUBSCRIPTION_MODE=mode),
    )
    await asyncio.gather(cluster.worker("worker-1"), cluster.worker("worker-2"))
    session_id = await create_session(node1, "alice", ["bob"])

    async with (
        connect(node1, "alice", "a1") as a1,
        connect(node2, "alice", "a2") as a2,
        connect(node2, "bob", "b1") as b1,
    ):
        msg_id = await a1.chat(session_id, "hello there")
        ack = await a1.until(is_type("ack", id=msg_id))
        assert ack["session_id"] == session_id

        got = {}
        for name, client in (("a1", a1), ("a2", a2), ("b1", b1)):
            got[name] = await client.until(is_type("message", message__client_msg_id=msg_id))
        assert got["a1"]["seq"] == got["a2"]["seq"], "alice's devices share one seq stream"
        assert got["a1"]["message"]["id"] == got["b1"]["message"]["id"]
        assert got["a1"]["message"]["role"] == "user"
        assert got["a1"]["message"]["device_id"] == "a1"
        assert got["b1"]["seq"] >= 1

        for client in (a1, a2, b1):
            await _reply_reaches(client, session_id, "hello there")

    rows = await messages_in_db(database_url, session_id)
    assert [(r["role"], r["client_msg_id"]) for r in rows][0] == ("user", msg_id)
    assert sum(1 for r in rows if r["client_msg_id"] == msg_id) == 1
    assert len(rows) == 2


async def test_seq_is_contiguous_and_shared_by_all_devices(cluster: Cluster) -> None:
    node1, node2 = await asyncio.gather(cluster.node(), cluster.node())
    await cluster.worker()
    session_id = await create_session(node1, "carol")
    async with connect(node1, "carol", "c1") as c1, connect(node2, "carol", "c2") as c2:
        for i in range(5):
            await c1.chat(session_id, f"m{i}")
        for client in (c1, c2):
            for _ in range(10):  # 5 user messages + 5 replies
                await client.until(lambda f: "seq" in f and f["type"] == "message")
        seqs = {
            name: [f["seq"] for f in c.frames if "seq" in f] for name, c in (("c1", c1), ("c2", c2))
        }
        start = c1.welcome["last_seq"]
        # the session frame (pending -> running) is logged too
        assert seqs["c1"] == list(range(start + 1, start + 1 + len(seqs["c1"])))
        assert seqs["c1"][: len(seqs["c2"])] == seqs["c2"][: len(seqs["c1"])]
