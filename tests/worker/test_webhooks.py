"""Webhooks (SPEC §10): signed, shaped like the API, in order per session, at least once
through receiver failures and a killed worker, dead-lettered after the maximum age, and
recorded in the same commit as the change they report."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
import uuid
from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis

from common.store.outbox import Outbox
from common.store.postgres import Store
from common.store.sessions import SessionChanges
from common.transport.keys import Keys
from tests.support.api import call, patch
from tests.support.harness import (
    Client,
    Cluster,
    connect,
    create_session,
    free_port,
    is_type,
    open_client,
)
from tests.support.webhook_receiver import HOOK_SECRET, Receiver, hook_settings, receiving
from worker.webhooks.signing import signature, verify


def _first_of_each(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Events without re-deliveries (at least once: an id may come twice)."""
    seen: set[str] = set()
    out = []
    for event in events:
        if event["id"] not in seen:
            seen.add(event["id"])
            out.append(event)
    return out


def _session_of(event: dict[str, Any]) -> str:
    data = event["data"]
    return str(data["session_id"] if "message" in data else data["session"]["id"])


def test_signature_is_hmac_sha256_of_timestamp_and_body() -> None:
    body = b'{"id":"1"}'
    sig = signature("s3cret", 1700000000, body)
    signed = b'1700000000.{"id":"1"}'  # SPEC §10: "{timestamp}.{body}"
    assert sig == "sha256=" + hmac.new(b"s3cret", signed, hashlib.sha256).hexdigest()
    assert verify("s3cret", "1700000000", sig, body, now=1700000100, tolerance=300)
    assert not verify("s3cret", "1700000000", sig, body + b" ", now=1700000100, tolerance=300)
    assert not verify("other", "1700000000", sig, body, now=1700000100, tolerance=300)
    assert not verify("s3cret", "1700000001", sig, body, now=1700000100, tolerance=300)
    assert not verify("s3cret", "1700000000", sig, body, now=1700001000, tolerance=300)


async def test_events_are_signed_ordered_and_shaped_like_the_api(cluster: Cluster) -> None:
    async with receiving(HOOK_SECRET) as rx:
        node = await cluster.node(**hook_settings(rx.url))
        await cluster.worker(**hook_settings(rx.url))
        session_id = await create_session(node, "olga", ["bert"])
        one = f"/api/v1/sessions/{session_id}"
        async with connect(node, "olga", "o1") as olga:
            await olga.chat(session_id, "hello hooks")
            await olga.until(is_type("message", message__content="You said: hello hooks"))
        _, history = await call(node, "GET", one + "/messages", "olga")
        assert (await patch(node, session_id, "olga", agent="human"))[0] == 200
        assert (await patch(node, session_id, "olga", status="cancelled"))[0] == 200
        # Refused (final status): nothing changed, so nothing is sent.
        assert (await patch(node, session_id, "olga", status="running"))[0] == 409
        assert (await call(node, "DELETE", one + "/participants/bert", "olga"))[0] == 204
        _, before_delete = await call(node, "GET", one, "olga")
        assert (await call(node, "DELETE", one, "olga"))[0] == 204
        await rx.wait_for(lambda r: bool(r.of_type("session.deleted")))
        await asyncio.sleep(0.3)  # anything sent after the delete would show up now

    assert rx.attempts and all(d.signed for d in rx.attempts)
    events = _first_of_each(rx.accepted)
    kinds = [(e["type"], e["data"].get("changes")) for e in events]
    # The first message starts the pending session: stored, then the status moves, in
    # one transaction; the reply follows.
    assert kinds == [
        ("message.created", None),
        ("session.updated", ["status"]),
        ("message.created", None),
        ("session.updated", ["agent"]),
        ("session.updated", ["status"]),
        ("session.updated", ["participants"]),
        ("session.deleted", None),
    ]
    ids = [int(e["id"]) for e in events]
    assert ids == sorted(ids)
    # `data` holds the objects the HTTP API returns.
    created = [e["data"] for e in events if e["type"] == "message.created"]
    assert created == [{"session_id": session_id, "message": m} for m in history["items"][::-1]]
    assert events[4]["data"]["session"]["status"] == "cancelled"
    assert events[5]["data"]["session"]["participants"] == ["olga"]
    assert events[6]["data"]["session"] == before_delete
    for event in events:
        assert set(event) == {"id", "type", "created_at", "data"}
        assert event["created_at"].endswith("Z")


async def test_each_sessions_events_arrive_in_order_through_failed_attempts(
    cluster: Cluster,
) -> None:
    async with receiving(HOOK_SECRET) as rx:
        rx.fail_first = 2  # every event fails twice before it is taken
        node = await cluster.node(**hook_settings(rx.url))
        await cluster.worker(**hook_settings(rx.url))
        owners = [f"u{k}" for k in range(3)]
        sessions = [await create_session(node, owner, agent="human") for owner in owners]
        clients = [await _open(node, owner) for owner in owners]
        try:
            for n in range(8):
                for client, session_id in zip(clients, sessions, strict=True):
                    await client.chat(session_id, f"m{n}", f"m{n}")
            for client in clients:
                await client.until(is_type("message", message__content="m7"))
        finally:
            for client in clients:
                await client.close()
        await rx.wait_for(lambda r: len(_first_of_each(r.of_type("message.created"))) == 24)

    assert all(d.signed for d in rx.attempts)
    failed = [d for d in rx.attempts if d.status == 500]
    assert len({d.event_id for d in failed}) == 27 and len(failed) == 54
    for session_id in sessions:
        mine = [e for e in _first_of_each(rx.accepted) if _session_of(e) == session_id]
        assert [int(e["id"]) for e in mine] == sorted(int(e["id"]) for e in mine)
        contents = [e["data"]["message"]["content"] for e in mine if e["type"] == "message.created"]
        assert contents == [f"m{n}" for n in range(8)]


async def test_a_receiver_that_was_down_gets_every_event(cluster: Cluster) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/hooks"
    node = await cluster.node(**hook_settings(url))
    worker = await cluster.worker(**hook_settings(url))
    session_id = await create_session(node, "olga", agent="human")
    async with connect(node, "olga", "o1") as olga:
        for n in range(5):
            await olga.chat(session_id, f"while down {n}", f"d{n}")
        await olga.until(is_type("message", message__content="while down 4"))
    # Connection refused, again and again: each attempt counts as failed.
    await _metric_reaches(worker.url, "fanout_webhooks_failed_total", 3)
    async with receiving(HOOK_SECRET, port) as rx:
        await rx.wait_for(lambda r: len(_first_of_each(r.of_type("message.created"))) == 5)
    sent = [
        e["data"]["message"]["client_msg_id"]
        for e in _first_of_each(rx.accepted)
        if e["type"] == "message.created"
    ]
    assert sent == [f"d{n}" for n in range(5)]
    # Five messages and the session's start; each delivery counted once it is recorded.
    await _metric_reaches(worker.url, "fanout_webhooks_sent_total", 6)
    assert await _metric(worker.url, "fanout_webhooks_retried_total") >= 3
    assert await _metric(worker.url, "fanout_webhooks_oldest_age_seconds") >= 0


async def test_a_hanging_receiver_holds_only_its_delivery_slots(cluster: Cluster) -> None:
    async with receiving(HOOK_SECRET) as rx:
        rx.hanging = True  # no answer within the minute-long timeout
        hooks = hook_settings(rx.url, FANOUT_WEBHOOK_TIMEOUT="60", FANOUT_WEBHOOK_CONCURRENCY="2")
        node = await cluster.node(**hooks)
        worker = await cluster.worker(**hooks)
        sessions = [await create_session(node, f"h{k}") for k in range(4)]
        clients = [await _open(node, f"h{k}") for k in range(4)]
        try:
            # Every chat of every session is answered while both delivery slots hang
            # (a delivery on the chat path would hold each reply for the minute).
            for round_ in range(3):
                for client, session_id in zip(clients, sessions, strict=True):
                    await client.chat(session_id, f"r{round_}", f"r{round_}")
                for client in clients:
                    await client.until(is_type("message", message__content=f"You said: r{round_}"))
            await rx.wait_for(lambda r: r.hanging_now == 2)
            _, backlog = await call(
                node, "GET", "/admin/webhooks/dead-letters", "root", roles=["admin"]
            )
            assert rx.hanging_now == 2  # bounded by FANOUT_WEBHOOK_CONCURRENCY
            assert backlog["waiting"] >= 4 * 7 - 2  # 4 × (6 messages + the start), 2 in flight
            # SIGTERM with both deliveries hanging: they are cancelled (left in the outbox
            # for the next holder) and the worker exits cleanly within its drain time.
            assert await asyncio.to_thread(worker.terminate, 15) == 0
            assert "Traceback" not in worker.log()
        finally:
            rx.hanging = False
            for client in clients:
                await client.close()


async def test_a_killed_worker_loses_no_acked_chats_event(
    cluster: Cluster, redis: aioredis.Redis, namespace: str
) -> None:
    async with receiving(HOOK_SECRET) as rx:
        hooks = hook_settings(rx.url)
        node = await cluster.node(**hooks)
        workers = [await cluster.worker(**hooks) for _ in range(2)]
        users = [f"k{k}" for k in range(10)]
        sessions = [await create_session(node, user, agent="human") for user in users]
        clients = [await _open(node, user) for user in users]
        acked: set[str] = set()
        try:
            for n in range(10):
                for user, client, session_id in zip(users, clients, sessions, strict=True):
                    await client.chat(session_id, f"c{n}", f"{user}-{n}")
                if n == 4:
                    # Mid-run: SIGKILL the worker holding the webhook lease.
                    holder = await redis.get(Keys(namespace).webhook_lease)
                    victim = next(w for w in workers if holder and holder.decode() == w.name)
                    victim.kill()
            for client in clients:
                acks = await _acks(client, 10)
                acked |= acks
        finally:
            for client in clients:
                await client.close()
        assert len(acked) == 100
        await rx.wait_for(lambda r: acked <= _created_ids(r), timeout=40)
    assert acked <= _created_ids(rx)


async def test_dead_letters_after_the_maximum_age_and_the_session_goes_on(
    cluster: Cluster,
) -> None:
    async with receiving(HOOK_SECRET) as rx:
        rx.failing = True
        hooks = hook_settings(rx.url, FANOUT_WEBHOOK_MAX_AGE="1")
        node = await cluster.node(**hooks)
        worker = await cluster.worker(**hooks)
        session_id = await create_session(node, "olga", agent="human")
        async with connect(node, "olga", "o1") as olga:
            await olga.chat(session_id, "doomed", "doomed")
            await olga.until(is_type("message", message__content="doomed"))
            path = "/admin/webhooks/dead-letters"
            deadline = time.monotonic() + 15
            body: dict[str, Any] = {}
            while time.monotonic() < deadline:
                _, body = await call(node, "GET", path, "root", roles=["admin"])
                if body["total"] == 2:
                    break
                await asyncio.sleep(0.2)
            assert body["total"] == 2 and body["waiting"] == 0 and body["enabled"] is True
            assert {d["type"] for d in body["items"]} == {"message.created", "session.updated"}
            assert all(d["session_id"] == session_id for d in body["items"])
            assert all(d["last_error"] == "HTTP 500" and d["attempts"] >= 1 for d in body["items"])
            assert (await call(node, "GET", path, "olga"))[0] == 403
            await _metric_reaches(worker.url, "fanout_webhooks_dead_lettered_total", 2)
            # The session's later events are not held behind the dead ones.
            rx.failing = False
            await olga.chat(session_id, "alive", "alive")
            await rx.wait_for(lambda r: "alive" in _created_ids(r))
    assert "doomed" not in _created_ids(rx)


async def test_events_are_written_in_the_commit_of_their_change(
    database_url: str, redis: aioredis.Redis
) -> None:
    async with Store.open(database_url, webhooks=True) as store:
        outbox = Outbox(store)
        session = await store.create_session(
            owner="olga", participants=["bert"], agent="human", ttl=60, metadata={}
        )
        assert (await outbox.backlog())[0] == 0  # creating a session is no event
        key = uuid.UUID(session.id)
        insert = (
            "INSERT INTO messages (session_id, client_msg_id, role, user_id, content)"
            " VALUES ($1, $2, 'user', 'olga', 'x') ON CONFLICT DO NOTHING"
        )
        # A change that rolls back leaves no event.
        async with store.acquire() as conn:
            rollback = conn.transaction()
            await rollback.start()
            await conn.execute(insert, key, "rolled-back")
            await conn.execute("UPDATE sessions SET status = 'running' WHERE id = $1", key)
            await rollback.rollback()
        assert (await outbox.backlog())[0] == 0
        await store.execute(insert, key, "kept")
        await store.execute(insert, key, "kept")  # a duplicate stores nothing: no event
        changes = SessionChanges(store, _NoBus(), _NoDirectory())  # type: ignore[arg-type]
        await changes.add_participant(session.id, "cleo", role="user", cap=10)
        await changes.add_participant(session.id, "cleo", role="user", cap=10)  # no change
        events = await outbox.due(set(), 10)
        assert [e.type for e in events] == ["message.created"]  # the head of the session
        # An existing participant made an agent changes the participants; the
        # sweeper's expiry is a status change like any other.
        await changes.add_participant(session.id, "bert", role="agent", cap=10)
        await store.execute(
            "UPDATE sessions SET expires_at = now() - interval '1 second' WHERE id = $1", key
        )
        assert await changes.expire_overdue(10) == [session.id]
        rows = await store.fetch("SELECT type, payload FROM webhook_outbox ORDER BY id")
        assert [(r["type"], orjson.loads(r["payload"]).get("changes")) for r in rows] == [
            ("message.created", None),
            ("session.updated", ["participants"]),
            ("session.updated", ["participants"]),
            ("session.updated", ["status"]),
        ]
    # A process without webhooks writes none.
    async with Store.open(database_url) as store:
        await store.create_session(owner="olga", participants=[], agent="ai", ttl=60, metadata={})
        await store.execute("DELETE FROM sessions WHERE id = $1", key)
        rows = await store.fetch("SELECT type FROM webhook_outbox ORDER BY id")
        assert len(rows) == 4


class _NoBus:
    async def deliver(self, *args: Any, **kwargs: Any) -> None:
        return None


class _NoDirectory:
    async def remember(self, *args: Any) -> None:
        return None


async def _open(node: Any, user: str) -> Client:
    return await open_client(node, user, f"{user}-d")


async def _acks(client: Client, count: int) -> set[str]:
    """The ids of the first `count` acks the client has or gets."""
    got: set[str] = set()
    for frame in client.frames:
        if frame.get("type") == "ack":
            got.add(frame["id"])
    while len(got) < count:
        frame = await client.recv(20)
        if frame.get("type") == "ack":
            got.add(frame["id"])
    return got


def _created_ids(rx: Receiver) -> set[str]:
    return {e["data"]["message"]["client_msg_id"] for e in rx.of_type("message.created")}


async def _metric_reaches(base: str, name: str, value: float, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while (got := await _metric(base, name)) < value:
        assert time.monotonic() < deadline, f"{name} stayed at {got}, below {value}"
        await asyncio.sleep(0.1)


async def _metric(base: str, name: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(f"{base}/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


async def test_a_round_reads_each_due_sessions_run_in_order(database_url: str) -> None:
    """The dispatcher's one query per round: each free session whose head is due, with its
    next events in id order (capped), none of a busy session or one whose head waits."""
    async with Store.open(database_url, webhooks=True) as store:
        outbox = Outbox(store)
        ids = []
        for _ in range(4):
            session = await store.create_session(
                owner="olga", participants=[], agent="human", ttl=60, metadata={}
            )
            ids.append(session.id)
        insert = (
            "INSERT INTO messages (session_id, client_msg_id, role, user_id, content)"
            " VALUES ($1, $2, 'user', 'olga', $2)"
        )
        for n in range(5):  # interleaved: ids of one session are not consecutive
            for sid in ids:
                await store.execute(insert, uuid.UUID(sid), f"m{n}")
        due, busy, waiting, fourth = ids
        events = {e.id: e for e in await outbox.due(set(), 100) if e.session_id in ids}
        head = min(e.id for e in events.values() if e.session_id == waiting)
        await outbox.retry_later(head, "HTTP 500", 60.0)  # its head waits: no run
        runs = [r for r in await outbox.due_runs({busy}, 100, 3) if r[0].session_id in ids]
        assert [r[0].session_id for r in runs] == [due, fourth]
        for run in runs:
            assert {e.session_id for e in run} == {run[0].session_id}
            assert [orjson.loads(e.body())["data"]["message"]["content"] for e in run] == [
                "m0",
                "m1",
                "m2",
            ]
            assert [e.id for e in run] == sorted(e.id for e in run)
        # Delivered ones go in one statement; the session's run then starts after them.
        await outbox.delivered([e.id for e in runs[0]])
        again = [r for r in await outbox.due_runs(set(), 100, 10) if r[0].session_id == due]
        assert [orjson.loads(e.body())["data"]["message"]["content"] for e in again[0]] == [
            "m3",
            "m4",
        ]
