"""Deleting a session takes its content out of the delivery logs, and a delete while a
reply streams is quiet (issue 13, SPEC §6)."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from common.transport.keys import Keys
from tests.support.harness import Client, Cluster, Proc, connect, create_session, is_type, token


async def _delete(node: Proc, user: str, session_id: str) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.delete(
            f"{node.url}/api/v1/sessions/{session_id}",
            headers={"Authorization": f"Bearer {token(user)}"},
        ) as resp,
    ):
        assert resp.status == 204, await resp.text()


async def _talk(client: Client, session_id: str, text: str) -> None:
    msg_id = await client.chat(session_id, text)
    await client.until(is_type("message", message__client_msg_id=msg_id))
    await client.until(is_type("message", message__content=f"You said: {text}"))


def _of(frames: list[dict[str, Any]], session_id: str) -> list[dict[str, Any]]:
    return [f for f in frames if f.get("session_id") == session_id]


async def test_a_resume_after_a_delete_replays_no_content_of_the_session(
    cluster: Cluster, redis: aioredis.Redis, namespace: str
) -> None:
    node = await cluster.node()
    await cluster.worker()
    doomed = await create_session(node, "olga", ["pete"])
    kept = await create_session(node, "olga", ["pete"])
    async with connect(node, "pete", "p1") as pete:
        before = pete.welcome["last_seq"]
    async with connect(node, "olga", "o1") as olga:
        await _talk(olga, doomed, "secret one")
        await _talk(olga, kept, "keep me")
        await _talk(olga, doomed, "secret two")
    await _delete(node, "olga", doomed)

    async with connect(node, "pete", "p1", last_seq=str(before)) as pete:
        resumed = await pete.until(is_type("resumed"))
        replayed = [f for f in pete.frames if "seq" in f]
    assert resumed["complete"] is True
    # Every seq is still there, in order: the deleted messages became tombstones.
    assert [f["seq"] for f in replayed] == list(range(before + 1, resumed["to"] + 1))
    gone = _of(replayed, doomed)
    assert not any(f["type"] == "message" for f in gone)
    # Its two messages and two replies, each now a tombstone under its own seq.
    assert sum(f["type"] == "session" and f["status"] == "deleted" for f in gone) == 4
    assert not any("secret" in str(f) for f in replayed)
    kept_texts = [f["message"]["content"] for f in _of(replayed, kept) if f["type"] == "message"]
    assert kept_texts == ["keep me", "You said: keep me"]
    # Nor is it left in Redis: the logs no longer hold the content.
    for user in ("olga", "pete"):
        entries = await redis.xrange(Keys(namespace).log(user))
        assert entries and not any(b"secret" in fields[b"f"] for _, fields in entries)


async def test_a_delete_while_a_reply_streams_logs_no_error(cluster: Cluster) -> None:
    node = await cluster.node()
    worker = await cluster.worker(FANOUT_ASSISTANT="tests.support.slow_assistant:make")
    session_id = await create_session(node, "quin", ["ruth"])
    async with connect(node, "quin", "q1") as quin:
        await quin.chat(session_id, "tell me a long story")
        await quin.until(is_type("message_delta"))
        await _delete(node, "quin", session_id)
        await asyncio.sleep(1.0)  # the reply watcher stops it; it would have ended by now
        later = await create_session(node, "quin")
        await _talk_to(quin, later)
    log = worker.log()
    assert " ERROR " not in log and "ForeignKeyViolation" not in log, log[-3000:]


async def _talk_to(client: Client, session_id: str) -> None:
    # The worker goes on answering (slowly) after the delete.
    msg_id = await client.chat(session_id, "still there?")
    await client.until(is_type("message", message__client_msg_id=msg_id))
