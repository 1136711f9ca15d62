"""The sessions HTTP API (SPEC §6): every transition, who sees what, bad input, pagination."""

from __future__ import annotations

import itertools
import uuid
from typing import Any

import aiohttp
import asyncpg
import pytest

from common.store.lifecycle import SETTABLE, STATUSES, can_change
from tests.support.api import call, patch
from tests.support.harness import (
    Cluster,
    Proc,
    connect,
    create_session,
    is_type,
    messages_in_db,
)


async def db_row(database_url: str, session_id: str) -> asyncpg.Record | None:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchrow("SELECT * FROM sessions WHERE id = $1", uuid.UUID(session_id))
    finally:
        await conn.close()


# How to bring a new (pending) session to each status through the API; `expired` is
# the sweeper's, so it is set in the database.
ROUTE_TO = {
    "pending": [],
    "running": ["running"],
    "paused": ["running", "paused"],
    "completed": ["completed"],
    "cancelled": ["running", "cancelled"],
    "failed": ["running", "paused", "failed"],
}


async def session_in(node: Proc, database_url: str, status: str, owner: str = "olive") -> str:
    session_id = await create_session(node, owner)
    if status == "expired":
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(
                "UPDATE sessions SET status = 'expired', version = version + 1,"
                " announced_version = version + 1 WHERE id = $1",
                uuid.UUID(session_id),
            )
        finally:
            await conn.close()
    for step in ROUTE_TO.get(status, []):
        code, body = await patch(node, session_id, owner, status=step)
        assert code == 200, body
    return session_id


@pytest.fixture
async def node(cluster: Cluster) -> Proc:
    return await cluster.node()


async def test_every_transition_is_allowed_or_refused_as_spec_says(
    node: Proc, database_url: str
) -> None:
    for current, target in itertools.product(sorted(STATUSES), sorted(SETTABLE)):
        session_id = await session_in(node, database_url, current)
        before = await db_row(database_url, session_id)
        assert before is not None and before["status"] == current
        code, body = await patch(node, session_id, "olive", status=target)
        after = await db_row(database_url, session_id)
        assert after is not None
        if can_change(current, target):
            assert code == 200, (current, target, body)
            assert body["status"] == target == after["status"]
            assert after["version"] == before["version"] + 1
        else:
            assert code == 409, (current, target, body)
            assert body["error"]["code"] == "CONFLICT"
            assert current in body["error"]["message"]
            assert after["status"] == current and after["version"] == before["version"]


async def test_only_the_sweeper_expires_and_nothing_returns_to_pending(
    node: Proc, database_url: str
) -> None:
    session_id = await session_in(node, database_url, "running")
    for target in ("expired", "pending", "teleported", 7):
        code, body = await patch(node, session_id, "olive", status=target)
        assert code == 400, target
        assert body["error"]["code"] == "BAD_REQUEST"
    row = await db_row(database_url, session_id)
    assert row is not None and row["status"] == "running"


async def test_a_closed_session_keeps_its_agent_and_ttl_but_takes_metadata(
    node: Proc, database_url: str
) -> None:
    session_id = await session_in(node, database_url, "completed")
    for change in ({"agent": "human"}, {"ttl": 60}, {"agent": "human", "metadata": {"a": 1}}):
        code, body = await patch(node, session_id, "olive", **change)
        assert code == 409, change
    code, body = await patch(node, session_id, "olive", metadata={"rating": 5})
    assert code == 200 and body["metadata"] == {"rating": 5} and body["status"] == "completed"


async def test_patch_ttl_and_agent_on_an_open_session(node: Proc) -> None:
    session_id = await create_session(node, "olive")
    code, body = await patch(node, session_id, "olive", ttl=120, agent="human")
    assert code == 200
    assert body["ttl"] == 120 and body["agent"] == "human" and body["status"] == "pending"
    code, again = await call(node, "GET", f"/api/v1/sessions/{session_id}", "olive")
    assert code == 200 and again == body


async def test_a_session_the_caller_may_not_see_is_404(node: Proc) -> None:
    session_id = await create_session(node, "olive", ["pete"])
    path = f"/api/v1/sessions/{session_id}"
    missing = f"/api/v1/sessions/{uuid.uuid4()}"
    for method, suffix, body in (
        ("GET", "", None),
        ("PATCH", "", {"status": "running"}),
        ("DELETE", "", None),
        ("GET", "/messages", None),
        ("POST", "/participants", {"user_id": "mallory"}),
    ):
        for target in (path, missing):
            code, answer = await call(node, method, target + suffix, "mallory", json=body)
            assert code == 404, (method, target + suffix)
            assert answer["error"]["code"] == "NOT_FOUND"
    # Participants and admins do see it.
    assert (await call(node, "GET", path, "pete"))[0] == 200
    assert (await call(node, "GET", path, "root", roles=["admin"]))[0] == 200
    # A participant who is not the owner may not delete it or add people; an admin may.
    assert (await call(node, "DELETE", path, "pete"))[0] == 403
    code, _ = await call(node, "POST", path + "/participants", "pete", json={"user_id": "zed"})
    assert code == 403
    assert (await call(node, "DELETE", path, "root", roles=["admin"]))[0] == 204
    assert (await call(node, "GET", path, "olive"))[0] == 404


async def test_delete_removes_the_session_and_its_messages(
    cluster: Cluster, node: Proc, database_url: str
) -> None:
    await cluster.worker()
    session_id = await create_session(node, "olive")
    async with connect(node, "olive", "o1") as olive:
        msg_id = await olive.chat(session_id, "to be forgotten")
        await olive.until(is_type("message", message__role="assistant"))
        assert len(await messages_in_db(database_url, session_id)) == 2
        code, _ = await call(node, "DELETE", f"/api/v1/sessions/{session_id}", "olive")
        assert code == 204
        assert await db_row(database_url, session_id) is None
        assert await messages_in_db(database_url, session_id) == []
        await olive.chat(session_id, "hello?", msg_id + "-2")
        error = await olive.until(is_type("error"))
        assert error["code"] == "NOT_FOUND"  # the node's cache forgot it at once
    assert (await call(node, "DELETE", f"/api/v1/sessions/{session_id}", "olive"))[0] == 404


async def test_owner_adds_a_participant(node: Proc) -> None:
    session_id = await create_session(node, "olive")
    path = f"/api/v1/sessions/{session_id}/participants"
    code, body = await call(node, "POST", path, "olive", json={"user_id": "quinn"})
    assert code == 200 and body["participants"] == ["olive", "quinn"]
    code, again = await call(node, "POST", path, "olive", json={"user_id": "quinn"})
    assert code == 200 and again["participants"] == ["olive", "quinn"]  # idempotent
    assert (await call(node, "GET", f"/api/v1/sessions/{session_id}", "quinn"))[0] == 200
    # Someone who is not an agent cannot join by themselves.
    code, _ = await call(node, "POST", path, "rita", json={"user_id": "rita"})
    assert code == 404
    await patch(node, session_id, "olive", status="cancelled")
    code, body = await call(node, "POST", path, "olive", json={"user_id": "sam"})
    assert code == 409 and body["error"]["code"] == "SESSION_CLOSED"


async def test_list_sessions_pages_by_keyset_and_filters_by_status(node: Proc) -> None:
    mine = [await create_session(node, "uma") for _ in range(5)]
    shared = await create_session(node, "vic", ["uma"])
    await create_session(node, "vic")  # not uma's
    await patch(node, mine[0], "uma", status="running")
    seen: list[str] = []
    params = {"limit": "2"}
    while True:
        code, page = await call(node, "GET", "/api/v1/sessions", "uma", params=params)
        assert code == 200 and len(page["items"]) <= 2
        seen += [s["id"] for s in page["items"]]
        if page["next"] is None:
            break
        params = {"limit": "2", "cursor": page["next"]}
    assert seen == [shared, *reversed(mine)], "newest first, each once"
    code, page = await call(node, "GET", "/api/v1/sessions", "uma", params={"status": "running"})
    assert [s["id"] for s in page["items"]] == [mine[0]] and page["next"] is None
    code, page = await call(node, "GET", "/api/v1/sessions", "root", roles=["admin"])
    assert len(page["items"]) == 7, "an admin sees every session"


async def test_bad_parameters_and_bodies_get_400(node: Proc) -> None:
    session_id = await create_session(node, "will")
    one = f"/api/v1/sessions/{session_id}"
    cases: list[tuple[str, str, Any, dict[str, str] | None]] = [
        ("GET", "/api/v1/sessions", None, {"status": "sleeping"}),
        ("GET", "/api/v1/sessions", None, {"limit": "0"}),
        ("GET", "/api/v1/sessions", None, {"limit": "abc"}),
        ("GET", "/api/v1/sessions", None, {"limit": "201"}),
        ("GET", "/api/v1/sessions", None, {"cursor": "!!not-a-cursor"}),
        ("GET", "/api/v1/sessions/not-a-uuid", None, None),
        ("GET", one + "/messages", None, {"before": "x"}),
        ("GET", one + "/messages", None, {"before": "-3"}),
        ("GET", one + "/messages", None, {"limit": "1000"}),
        ("GET", one + "/messages", None, {"limit": "²"}),
        ("GET", one + "/messages", None, {"before": "9" * 30}),
        ("PATCH", one, {}, None),
        ("PATCH", one, {"status": None}, None),
        ("PATCH", one, {"owner": "me"}, None),
        ("PATCH", one, {"agent": "robot"}, None),
        ("PATCH", one, {"ttl": 0}, None),
        ("PATCH", one, {"ttl": "60"}, None),
        ("PATCH", one, {"metadata": []}, None),
        ("PATCH", one, [1, 2], None),
        ("POST", one + "/participants", {}, None),
        ("POST", one + "/participants", {"user_id": ""}, None),
        ("POST", one + "/participants", {"user_id": "x" * 129}, None),
        ("POST", "/api/v1/sessions", {"participants": ["ok", 3]}, None),
        # Postgres cannot store U+0000: a clear 400, not a failed INSERT.
        ("POST", "/api/v1/sessions", {"participants": ["nul\x00"]}, None),
        ("POST", "/api/v1/sessions", {"metadata": {"k": ["v\x00"]}}, None),
        ("PATCH", one, {"metadata": {"k\x00": 1}}, None),
        ("POST", one + "/participants", {"user_id": "a\x00b"}, None),
    ]
    for method, path, body, params in cases:
        code, answer = await call(node, method, path, "will", json=body, params=params)
        assert code == 400, (method, path, body, params, answer)
        assert answer["error"]["code"] == "BAD_REQUEST" and answer["error"]["message"]
    async with aiohttp.ClientSession() as http, http.get(f"{node.url}{one}") as resp:
        assert resp.status == 401


async def test_presence_is_for_self_agents_and_admins(node: Proc) -> None:
    async with connect(node, "xena", "x1"):
        code, body = await call(node, "GET", "/api/v1/presence/xena", "xena")
        assert code == 200 and body["online"] is True
        assert [d["device_id"] for d in body["devices"]] == ["x1"]
        assert (await call(node, "GET", "/api/v1/presence/xena", "yan", roles=["agent"]))[0] == 200
        assert (await call(node, "GET", "/api/v1/presence/xena", "r", roles=["admin"]))[0] == 200
        code, body = await call(node, "GET", "/api/v1/presence/xena", "yan")
        assert code == 403 and body["error"]["code"] == "FORBIDDEN"
    code, body = await call(node, "GET", "/api/v1/presence/nobody", "nobody")
    assert code == 200 and body == {"user_id": "nobody", "online": False, "devices": []}


async def test_openapi_describes_every_route(node: Proc) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{node.url}/api/v1/openapi.json") as resp,
    ):
        assert resp.status == 200
        doc = await resp.json()
    assert doc["openapi"].startswith("3.")
    expected = {
        ("/api/v1/sessions", "post"),
        ("/api/v1/sessions", "get"),
        ("/api/v1/sessions/{session_id}", "get"),
        ("/api/v1/sessions/{session_id}", "patch"),
        ("/api/v1/sessions/{session_id}", "delete"),
        ("/api/v1/sessions/{session_id}/participants", "post"),
        ("/api/v1/sessions/{session_id}/messages", "get"),
        ("/api/v1/presence/{user_id}", "get"),
        ("/api/v1/openapi.json", "get"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
    }
    documented = {(p, m) for p, ops in doc["paths"].items() for m in ops}
    assert expected <= documented
    schemas = doc["components"]["schemas"]
    for path, ops in doc["paths"].items():
        for op in ops.values():
            assert op["responses"], path
            for answer in op["responses"].values():
                ref = answer.get("content", {}).get("application/json", {}).get("schema", {})
                if "$ref" in ref:
                    assert ref["$ref"].rsplit("/", 1)[1] in schemas
    assert set(schemas["Session"]["required"]) == {
        "id",
        "owner",
        "participants",
        "status",
        "agent",
        "metadata",
        "ttl",
        "created_at",
        "updated_at",
        "last_activity_at",
        "expires_at",
    }
