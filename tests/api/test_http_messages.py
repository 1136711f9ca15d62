"""POST /api/v1/sessions/{id}/messages (SPEC §6): validation, idempotency, roles, path."""

from __future__ import annotations

import uuid

from tests.support.api import call, patch
from tests.support.harness import Cluster, connect, create_session, is_type, messages_in_db


def _nested(depth: int) -> dict[str, object]:
    value: dict[str, object] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


def _post(session_id: str) -> str:
    return f"/api/v1/sessions/{session_id}/messages"


async def test_a_participant_posts_once_per_client_id(cluster: Cluster, database_url: str) -> None:
    node = await cluster.node()
    await cluster.worker()
    session_id = await create_session(node, "olga", ["bert"], agent="human")
    async with connect(node, "bert", "b1") as bert:
        body = {"client_msg_id": "m-1", "content": "from a backend", "metadata": {"k": 1}}
        code, answer = await call(node, "POST", _post(session_id), "olga", json=body)
        assert code == 202
        assert answer == {"client_msg_id": "m-1", "session_id": session_id}
        frame = await bert.until(is_type("message", message__content="from a backend"))
        message = frame["message"]
        assert message["role"] == "user" and message["user_id"] == "olga"
        assert message["metadata"] == {"k": 1} and message["device_id"] == "http"
        # A retry with the same client id is accepted again and stored once.
        for _ in range(3):
            assert (await call(node, "POST", _post(session_id), "olga", json=body))[0] == 202
        await bert.chat(session_id, "marker")
        await bert.until(is_type("message", message__content="marker"))
        rows = await messages_in_db(database_url, session_id)
        assert [r["content"] for r in rows] == ["from a backend", "marker"]
        # The first message started the session, as a chat frame's would.
        code, session = await call(node, "GET", f"/api/v1/sessions/{session_id}", "olga")
        assert session["status"] == "running"


async def test_an_ai_session_answers_a_posted_user_message(cluster: Cluster) -> None:
    node = await cluster.node()
    await cluster.worker()
    session_id = await create_session(node, "olga")
    async with connect(node, "olga", "o1") as olga:
        body = {"client_msg_id": "m-1", "content": "hi over http"}
        assert (await call(node, "POST", _post(session_id), "olga", json=body))[0] == 202
        await olga.until(is_type("message", message__content="You said: hi over http"))


async def test_a_service_posts_as_assistant_or_system_into_any_session(
    cluster: Cluster, database_url: str
) -> None:
    node = await cluster.node()
    await cluster.worker()
    session_id = await create_session(node, "olga")
    svc = ["service"]
    async with connect(node, "olga", "o1") as olga:
        for role in ("assistant", "system"):
            body = {"client_msg_id": f"s-{role}", "content": f"as {role}", "role": role}
            code, _ = await call(node, "POST", _post(session_id), "bot", roles=svc, json=body)
            assert code == 202
            frame = await olga.until(is_type("message", message__content=f"as {role}"))
            assert frame["message"]["role"] == role and frame["message"]["user_id"] == "bot"
        # Without a role a service posts as the assistant; never as a person.
        body = {"client_msg_id": "s-default", "content": "default"}
        assert (await call(node, "POST", _post(session_id), "bot", roles=svc, json=body))[0] == 202
        await olga.until(is_type("message", message__content="default"))
        for role in ("user", "agent"):
            body = {"client_msg_id": "s-x", "content": "x", "role": role}
            code, answer = await call(node, "POST", _post(session_id), "bot", roles=svc, json=body)
            assert code == 403 and answer["error"]["code"] == "FORBIDDEN"
        # A session that does not exist is 404 for a service too.
        body = {"client_msg_id": "s-y", "content": "y"}
        code, _ = await call(node, "POST", _post(str(uuid.uuid4())), "bot", roles=svc, json=body)
        assert code == 404
        await olga.chat(session_id, "marker")
        await olga.until(is_type("message", message__content="You said: marker"))
    rows = await messages_in_db(database_url, session_id)
    # Assistant and system posts take no assistant reply; the user's chat does.
    assert [(r["role"], r["content"]) for r in rows] == [
        ("assistant", "as assistant"),
        ("system", "as system"),
        ("assistant", "default"),
        ("user", "marker"),
        ("assistant", "You said: marker"),
    ]


async def test_roles_and_visibility_are_enforced(cluster: Cluster) -> None:
    node = await cluster.node()
    session_id = await create_session(node, "olga")
    path = _post(session_id)
    for role in ("assistant", "system"):
        body = {"client_msg_id": "m", "content": "x", "role": role}
        code, answer = await call(node, "POST", path, "olga", json=body)
        assert code == 403 and answer["error"]["code"] == "FORBIDDEN"
    body = {"client_msg_id": "m", "content": "x"}
    # Not a participant (an agent or a stranger), or no such session: 404 alike.
    for user, roles in (("mallory", None), ("ava", ["agent"])):
        code, answer = await call(node, "POST", path, user, roles=roles, json=body)
        assert code == 404 and answer["error"]["code"] == "NOT_FOUND"
    assert (await call(node, "POST", _post(str(uuid.uuid4())), "olga", json=body))[0] == 404
    await patch(node, session_id, "olga", status="completed")
    code, answer = await call(node, "POST", path, "olga", json=body)
    assert code == 409 and answer["error"]["code"] == "SESSION_CLOSED"


async def test_the_body_is_validated_like_a_chat_frame(cluster: Cluster) -> None:
    node = await cluster.node(FANOUT_MAX_CONTENT="16")
    path = _post(await create_session(node, "olga"))
    cases = [
        ({"content": "no id"}, 400, "BAD_REQUEST"),
        ({"client_msg_id": "x" * 65, "content": "long id"}, 400, "BAD_REQUEST"),
        ({"client_msg_id": "m", "content": 5}, 400, "BAD_REQUEST"),
        ({"client_msg_id": "m", "content": "x", "metadata": [1]}, 400, "BAD_REQUEST"),
        ({"client_msg_id": "m", "content": "nul\x00"}, 400, "BAD_REQUEST"),
        ({"client_msg_id": "m", "content": "x", "role": "boss"}, 400, "BAD_REQUEST"),
        ({"client_msg_id": "m", "content": "x", "extra": 1}, 400, "BAD_REQUEST"),
        ({"client_msg_id": "m", "content": "y" * 17}, 413, "MSG_TOO_LARGE"),
        # Nested past what orjson encodes (255): refused, not a 500 (issue 13 item 3).
        ({"client_msg_id": "m", "content": "x", "metadata": _nested(300)}, 400, "BAD_REQUEST"),
        ({"client_msg_id": "m", "content": "x", "metadata": _nested(20)}, 400, "BAD_REQUEST"),
    ]
    for body, status, code in cases:
        got, answer = await call(node, "POST", path, "olga", json=body)
        assert (got, answer["error"]["code"]) == (status, code), body
