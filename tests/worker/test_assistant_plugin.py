"""FANOUT_ASSISTANT=module:callable: a user's generator from a file of their own (SPEC §10)."""

from __future__ import annotations

from tests.support.harness import Cluster, connect, create_session, is_type, messages_in_db


async def test_a_module_callable_generator_answers(cluster: Cluster, database_url: str) -> None:
    node = await cluster.node()
    await cluster.worker(FANOUT_ASSISTANT="tests.support.assistant_plugin:make")
    session_id = await create_session(node, "vera")
    async with connect(node, "vera", "phone") as vera:
        await vera.chat(session_id, "speak up please")
        reply = await vera.until(
            lambda f: f["type"] == "message" and f["message"]["role"] == "assistant"
        )
        deltas = [f["delta"] for f in vera.frames if is_type("message_delta")(f)]
    assert reply["message"]["content"] == "vera: SPEAK UP PLEASE"
    assert "".join(deltas) == reply["message"]["content"]
    rows = await messages_in_db(database_url, session_id)
    assert [r["content"] for r in rows] == ["speak up please", "vera: SPEAK UP PLEASE"]


async def test_a_callable_that_cannot_be_loaded_stops_the_worker_with_one_line(
    cluster: Cluster,
) -> None:
    worker = await cluster.worker(FANOUT_ASSISTANT="tests.no_such_module:make", ready=False)
    assert worker.popen.wait(20) == 2, worker.log()
    assert "FANOUT_ASSISTANT=tests.no_such_module:make: cannot load it" in worker.log()
