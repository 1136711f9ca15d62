"""Participants (SPEC §6, issue 13 item 5): removal and leaving, and the cap on every add."""

from __future__ import annotations

import asyncio

from tests.support.api import call
from tests.support.harness import Cluster, connect, create_session, is_type


async def test_owner_removes_a_participant_and_a_participant_leaves(cluster: Cluster) -> None:
    node = await cluster.node()
    session_id = await create_session(node, "olga", ["bert", "cleo", "dana"])
    one = f"/api/v1/sessions/{session_id}"
    members = one + "/participants/"
    # Only the owner or an admin removes someone else; strangers do not see the session.
    assert (await call(node, "DELETE", members + "cleo", "bert"))[0] == 403
    assert (await call(node, "DELETE", members + "cleo", "mallory"))[0] == 404
    assert (await call(node, "DELETE", members + "nobody", "olga"))[0] == 404
    assert (await call(node, "DELETE", members + "bert", "olga"))[0] == 204
    code, body = await call(node, "GET", one, "olga")
    assert sorted(body["participants"]) == ["cleo", "dana", "olga"]
    assert (await call(node, "GET", one, "bert"))[0] == 404  # gone means gone
    assert (await call(node, "DELETE", members + "bert", "olga"))[0] == 404  # not twice
    # A participant leaves by removing themself; an admin removes anyone but the owner.
    assert (await call(node, "DELETE", members + "cleo", "cleo"))[0] == 204
    assert (await call(node, "DELETE", members + "dana", "root", roles=["admin"]))[0] == 204
    # The owner cannot leave, nor be removed: the session is deleted instead.
    code, body = await call(node, "DELETE", members + "olga", "olga")
    assert code == 409 and body["error"]["code"] == "CONFLICT"
    code, _ = await call(node, "DELETE", members + "olga", "root", roles=["admin"])
    assert code == 409
    code, body = await call(node, "GET", one, "olga")
    assert body["participants"] == ["olga"]


async def test_a_removed_participant_can_no_longer_chat(cluster: Cluster) -> None:
    node = await cluster.node()
    await cluster.worker()
    session_id = await create_session(node, "olga", ["bert"], agent="human")
    async with connect(node, "olga", "o1") as olga, connect(node, "bert", "b1") as bert:
        await bert.chat(session_id, "before")
        await olga.until(is_type("message", message__content="before"))
        assert (
            await call(node, "DELETE", f"/api/v1/sessions/{session_id}/participants/bert", "olga")
        )[0] == 204
        # The change is announced: the owner's devices hear of it, and the node's
        # session cache holds the new participants at once.
        await olga.until(is_type("session", session_id=session_id))
        await bert.chat(session_id, "after", "after-1")
        error = await bert.until(is_type("error", id="after-1"))
        assert error["code"] == "FORBIDDEN"
        await olga.chat(session_id, "still here")
        await olga.until(is_type("message", message__content="still here"))
        assert not [f for f in olga.frames if f.get("message", {}).get("content") == "after"]


async def test_every_add_is_capped(cluster: Cluster) -> None:
    node = await cluster.node(FANOUT_MAX_PARTICIPANTS="4")
    add = "/api/v1/sessions/{}/participants"
    # At creation the owner counts: three others fill a session of four.
    code, body = await call(
        node, "POST", "/api/v1/sessions", "olga", json={"participants": ["a", "b", "c", "d"]}
    )
    assert code == 400
    session_id = await create_session(node, "olga", ["a", "b"])
    path = add.format(session_id)
    assert (await call(node, "POST", path, "olga", json={"user_id": "c"}))[0] == 200
    code, body = await call(node, "POST", path, "olga", json={"user_id": "d"})
    assert code == 409 and body["error"]["code"] == "TOO_MANY_PARTICIPANTS"
    # An agent joining by themself is capped too; re-adding a participant is not an add.
    code, body = await call(node, "POST", path, "ava", roles=["agent"], json={"user_id": "ava"})
    assert code == 409 and body["error"]["code"] == "TOO_MANY_PARTICIPANTS"
    assert (await call(node, "POST", path, "olga", json={"user_id": "a"}))[0] == 200
    # A removal frees a place.
    assert (await call(node, "DELETE", f"{path}/a", "olga"))[0] == 204
    assert (await call(node, "POST", path, "olga", json={"user_id": "d"}))[0] == 200
    code, body = await call(node, "GET", f"/api/v1/sessions/{session_id}", "olga")
    assert sorted(body["participants"]) == ["b", "c", "d", "olga"]


async def test_racing_adds_never_overshoot_the_cap(cluster: Cluster) -> None:
    node = await cluster.node(FANOUT_MAX_PARTICIPANTS="5")
    session_id = await create_session(node, "olga")
    path = f"/api/v1/sessions/{session_id}/participants"
    results = await asyncio.gather(
        *(call(node, "POST", path, "olga", json={"user_id": f"u{k}"}) for k in range(12))
    )
    codes = sorted(code for code, _ in results)
    assert codes == [200] * 4 + [409] * 8, codes
    _code, body = await call(node, "GET", f"/api/v1/sessions/{session_id}", "olga")
    assert len(body["participants"]) == 5
