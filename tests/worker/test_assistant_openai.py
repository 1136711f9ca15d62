"""FANOUT_ASSISTANT=openai against a local OpenAI-compatible server (SPEC §10).

Real node and worker processes; the model is tests/support/fake_openai.py, started by the
test on loopback.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from common.transport.keys import Keys, partition_of
from tests.support.api import call, patch
from tests.support.fake_openai import FakeOpenAI
from tests.support.harness import Client, Cluster, connect, create_session, is_type, messages_in_db

PARTITIONS = 4  # tests/conftest.py's env


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as server:
        yield server


def openai_env(fake: FakeOpenAI, **extra: str) -> dict[str, Any]:  # worker(**env)
    return {
        "FANOUT_ASSISTANT": "openai",
        "FANOUT_ASSISTANT_URL": fake.url,
        "FANOUT_ASSISTANT_MODEL": "fake-model-1",
        "FANOUT_ASSISTANT_API_KEY": "sk-test-123",
        "FANOUT_ASSISTANT_SYSTEM_PROMPT": "You are terse.",
        "FANOUT_ASSISTANT_RETRIES": "2",
        "FANOUT_ASSISTANT_RETRY_DELAY": "0.05",
        **extra,
    }


def _deltas(client: Client, reply_id: int) -> str:
    return "".join(
        f["delta"]
        for f in client.frames
        if f["type"] == "message_delta" and f["message_id"] == reply_id
    )


async def _reply_to(client: Client, session_id: str, content: str) -> dict[str, Any]:
    """Send a chat; the assistant's (or system's) message that answers it."""
    await client.chat(session_id, content)
    frame = await client.until(
        lambda f: (
            f["type"] == "message"
            and f["session_id"] == session_id
            and f["message"]["role"] in ("assistant", "system")
        )
    )
    message: dict[str, Any] = frame["message"]
    return message


async def _wait_for(predicate: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_deltas_make_the_stored_reply_and_the_request_carries_the_context(
    cluster: Cluster, database_url: str, fake: FakeOpenAI
) -> None:
    node = await cluster.node()
    await cluster.worker(**openai_env(fake))
    session_id = await create_session(node, "olga")
    async with connect(node, "olga", "phone") as olga:
        first = await _reply_to(olga, session_id, "hello there")
        second = await _reply_to(olga, session_id, "and again")

    assert second["content"] == "Echo: and again"
    assert _deltas(olga, second["id"]) == second["content"], "deltas concatenate to the reply"
    rows = await messages_in_db(database_url, session_id)
    assert [(r["role"], r["content"]) for r in rows] == [
        ("user", "hello there"),
        ("assistant", first["content"]),
        ("user", "and again"),
        ("assistant", "Echo: and again"),
    ], "each reply stored once"

    assert len(fake.peers) == 1, "one kept-alive connection for both requests"
    seen = fake.requests[-1]
    assert seen.headers["Authorization"] == "Bearer sk-test-123"
    assert seen.body["model"] == "fake-model-1"
    assert seen.body["stream"] is True
    assert seen.body["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "Echo: hello there"},
        {"role": "user", "content": "and again"},
    ], "system prompt, then the session's history in order"


async def test_history_is_cut_to_the_last_n_messages(cluster: Cluster, fake: FakeOpenAI) -> None:
    node = await cluster.node()
    await cluster.worker(**openai_env(fake, FANOUT_ASSISTANT_HISTORY="2"))
    session_id = await create_session(node, "pia")
    async with connect(node, "pia", "phone") as pia:
        for text in ("one", "two", "three"):
            await _reply_to(pia, session_id, text)
    assert fake.bodies()[-1]["messages"][1:] == [
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "Echo: two"},
        {"role": "user", "content": "three"},
    ], "the two earlier messages and the one answered"


async def test_a_failing_server_gets_retried_then_a_system_error_and_the_session_goes_on(
    cluster: Cluster, database_url: str, fake: FakeOpenAI
) -> None:
    node = await cluster.node()
    worker = await cluster.worker(**openai_env(fake))
    session_id = await create_session(node, "quinn")
    fake.fail_with = 500
    async with connect(node, "quinn", "phone") as quinn:
        failed = await _reply_to(quinn, session_id, "are you there")
        assert failed["role"] == "system"
        assert "HTTP 500" in failed["metadata"]["error"]
        assert len(fake.requests) == 3, "the first attempt and FANOUT_ASSISTANT_RETRIES=2"

        fake.fail_with = None
        ok = await _reply_to(quinn, session_id, "now?")
        assert (ok["role"], ok["content"]) == ("assistant", "Echo: now?")
    rows = await messages_in_db(database_url, session_id)
    assert [r["role"] for r in rows] == ["user", "system", "user", "assistant"]
    async with aiohttp.ClientSession() as http, http.get(f"{worker.url}/metrics") as resp:
        metrics = await resp.text()
    assert 'fanout_worker_replies_total{outcome="failed"} 1.0' in metrics
    assert 'fanout_worker_replies_total{outcome="complete"} 1.0' in metrics
    assert orjson.loads(rows[1]["metadata"])["error"] == failed["metadata"]["error"]


async def test_a_malformed_stream_is_an_error_too(cluster: Cluster, fake: FakeOpenAI) -> None:
    node = await cluster.node()
    await cluster.worker(**openai_env(fake, FANOUT_ASSISTANT_RETRIES="0"))
    session_id = await create_session(node, "rae")
    async with connect(node, "rae", "phone") as rae:
        failed = await _reply_to(rae, session_id, "garbage please")
    assert failed["role"] == "system"
    assert "malformed" in failed["metadata"]["error"]


async def test_pausing_mid_reply_stores_what_was_generated_as_interrupted(
    cluster: Cluster, database_url: str, fake: FakeOpenAI
) -> None:
    node = await cluster.node()
    await cluster.worker(**openai_env(fake))
    session_id = await create_session(node, "sam")
    async with connect(node, "sam", "phone") as sam:
        await sam.chat(session_id, "stall for a while")
        delta = await sam.until(is_type("message_delta", session_id=session_id))
        assert delta["delta"] == "Thinking"
        code, _ = await patch(node, session_id, "sam", status="paused")
        assert code == 200
        reply = await sam.until(
            lambda f: f["type"] == "message" and f["message"]["role"] == "assistant"
        )
    assert reply["message"]["content"] == "Thinking"
    assert reply["message"]["metadata"] == {"interrupted": True}
    assert reply["message"]["id"] == delta["message_id"], "stored under the streamed id"
    rows = await messages_in_db(database_url, session_id)
    assert [(r["role"], r["content"]) for r in rows] == [
        ("user", "stall for a while"),
        ("assistant", "Thinking"),
    ]
    assert orjson.loads(rows[1]["metadata"]) == {"interrupted": True}


async def _same_partition_sessions(node: Any, owner: str) -> tuple[str, str]:
    made: dict[int, str] = {}
    for _ in range(50):
        session_id = await create_session(node, owner)
        partition = partition_of(session_id, PARTITIONS)
        if partition in made:
            return made[partition], session_id
        made[partition] = session_id
    raise AssertionError("no two sessions in one partition")


async def test_a_stalled_reply_does_not_hold_its_partition(
    cluster: Cluster, fake: FakeOpenAI
) -> None:
    node = await cluster.node()
    await cluster.worker(**openai_env(fake))
    stalled, flowing = await _same_partition_sessions(node, "tess")
    async with connect(node, "tess", "phone") as tess:
        await tess.chat(stalled, "stall here")
        await _wait_for(lambda: fake.stalled == 1)
        # The same partition, while the other reply waits on the model.
        for text in ("first", "second"):
            reply = await _reply_to(tess, flowing, text)
            assert reply["content"] == f"Echo: {text}"
        assert fake.stalled == 1 and not fake.release.is_set(), "still stalled meanwhile"
        fake.release.set()
        late = await tess.until(
            lambda f: (
                f["type"] == "message"
                and f["session_id"] == stalled
                and f["message"]["role"] == "assistant"
            )
        )
    assert late["message"]["content"] == "ThinkingEcho: stall here"
    assert "metadata" not in late["message"]


async def test_a_worker_killed_mid_reply_leaves_the_reply_owed_to_the_next(
    cluster: Cluster, database_url: str, fake: FakeOpenAI
) -> None:
    node = await cluster.node()
    first = await cluster.worker(**openai_env(fake))
    session_id = await create_session(node, "uma")
    async with connect(node, "uma", "phone") as uma:
        await uma.chat(session_id, "stall then die")
        await _wait_for(lambda: fake.stalled == 1)
        first.kill()  # SIGKILL: the entry was acknowledged, the reply not yet made
        fake.release.set()
        await cluster.worker(**openai_env(fake))
        reply = await uma.until(
            lambda f: f["type"] == "message" and f["message"]["role"] == "assistant",
            timeout=20,
        )
    assert reply["message"]["content"] == "ThinkingEcho: stall then die"
    rows = await messages_in_db(database_url, session_id)
    assert [r["role"] for r in rows] == ["user", "assistant"], "the reply made once"


@pytest.mark.parametrize(
    ("change", "kept"),
    [({"agent": "human"}, True), ({"status": "completed"}, True), (None, False)],
    ids=["hand-off", "close", "delete"],
)
async def test_a_hand_off_close_or_delete_mid_reply_stops_it(
    cluster: Cluster,
    database_url: str,
    fake: FakeOpenAI,
    redis: Any,
    namespace: str,
    change: dict[str, str] | None,
    kept: bool,
) -> None:
    node = await cluster.node()
    await cluster.worker(**openai_env(fake))
    session_id = await create_session(node, "wes")
    async with connect(node, "wes", "phone") as wes:
        await wes.chat(session_id, "stall until told")
        await wes.until(is_type("message_delta", session_id=session_id))
        if change is None:
            code, _ = await call(node, "DELETE", f"/api/v1/sessions/{session_id}", "wes")
            assert code == 204
        else:
            code, _ = await patch(node, session_id, "wes", **change)
            assert code == 200
        if kept:
            reply = await wes.until(
                lambda f: f["type"] == "message" and f["message"]["role"] == "assistant"
            )
            assert reply["message"]["content"] == "Thinking"
            assert reply["message"]["metadata"] == {"interrupted": True}
    # Nothing is owed any more: the reply was stopped, not left for another worker.
    owed_key = Keys(namespace).owed_replies(partition_of(session_id, PARTITIONS))
    await _wait_for_async(lambda: redis.hlen(owed_key), 0)
    assert fake.stalled == 1 and len(fake.requests) == 1, "no second attempt"
    rows = await messages_in_db(database_url, session_id)
    assert [r["role"] for r in rows] == (["user", "assistant"] if kept else [])


async def test_the_concurrency_cap_holds_replies_beyond_it(
    cluster: Cluster, fake: FakeOpenAI
) -> None:
    node = await cluster.node()
    await cluster.worker(**openai_env(fake, FANOUT_ASSISTANT_CONCURRENCY="1"))
    stalled = await create_session(node, "xia")
    waiting = await create_session(node, "xia")
    async with connect(node, "xia", "phone") as xia:
        await xia.chat(stalled, "stall first")
        await _wait_for(lambda: fake.stalled == 1)
        msg = await xia.chat(waiting, "then me")
        await xia.until(is_type("message", message__client_msg_id=msg))
        await asyncio.sleep(0.5)
        assert len(fake.requests) == 1, "the second reply waits for the one slot"
        fake.release.set()
        reply = await xia.until(
            lambda f: (
                f["type"] == "message"
                and f["session_id"] == waiting
                and f["message"]["role"] == "assistant"
            )
        )
    assert reply["message"]["content"] == "Echo: then me"


async def _wait_for_async(read: Any, expected: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while (value := await read()) != expected:
        assert time.monotonic() < deadline, f"still {value!r}"
        await asyncio.sleep(0.05)


async def test_a_drained_worker_leaves_a_stalled_reply_to_the_next(
    cluster: Cluster, database_url: str, fake: FakeOpenAI
) -> None:
    node = await cluster.node()
    first = await cluster.worker(**openai_env(fake))
    session_id = await create_session(node, "yan")
    async with connect(node, "yan", "phone") as yan:
        await yan.chat(session_id, "stall through the drain")
        await _wait_for(lambda: fake.stalled == 1)
        started = time.monotonic()
        assert first.terminate() == 0  # SIGTERM: the reply gets its grace, then is left
        assert time.monotonic() - started < 10
        fake.release.set()
        await cluster.worker(**openai_env(fake))
        reply = await yan.until(
            lambda f: f["type"] == "message" and f["message"]["role"] == "assistant",
            timeout=20,
        )
    assert reply["message"]["content"] == "ThinkingEcho: stall through the drain"
    assert len(fake.requests) == 2, "the drained worker's attempt, then the next owner's"
    rows = await messages_in_db(database_url, session_id)
    assert [r["role"] for r in rows] == ["user", "assistant"]
