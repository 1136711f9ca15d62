"""fanout.js in real Chromium against real nodes and workers (SPEC §11, issue 15)."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid

import aiohttp
from playwright.async_api import Browser

from tests.browser.fanout_page import fanout_page
from tests.support.harness import (
    Client,
    Cluster,
    connect,
    create_session,
    free_port,
    messages_in_db,
    token,
)

SENDS = 40  # chats sent while one page's node is killed
SEND_GAP = 0.1  # seconds between them: well under FANOUT_RATE (20 frames/s)


def message_seqs(messages: list[dict[str, object]], client_msg_id: str) -> list[object]:
    return [m["seq"] for m in messages if m["message"]["client_msg_id"] == client_msg_id]  # type: ignore[index]


async def test_two_devices_on_two_nodes_and_another_participant(
    cluster: Cluster, browser: Browser
) -> None:
    node1, node2 = await asyncio.gather(cluster.node("node-1"), cluster.node("node-2"))
    await cluster.worker()
    session_id = await create_session(node1, "ann", ["ben"], agent="human")
    async with (
        fanout_page(browser, node1, "ann", "a1", [node1, node2]) as a1,
        fanout_page(browser, node2, "ann", "a2", [node2, node1]) as a2,
        fanout_page(browser, node2, "ben", "b1", [node2, node1]) as b1,
    ):
        await asyncio.gather(a1.wait_open("node-1"), a2.wait_open("node-2"), b1.wait_open())

        # send() resolves on the ack; every device of both users gets the message.
        acked = await a1.call("client.send(args[0], 'hello from a1')", session_id)
        assert acked["session_id"] == session_id
        sent_id = acked["id"]
        pages = {"a1": a1, "a2": a2, "b1": b1}
        for page in pages.values():
            await page.wait_for(
                f"log.messages.some((m) => m.message.client_msg_id === '{sent_id}')"
            )
        got = {name: await page.log("messages") for name, page in pages.items()}
        a1_seqs, a2_seqs = message_seqs(got["a1"], sent_id), message_seqs(got["a2"], sent_id)
        assert a1_seqs == a2_seqs and len(a1_seqs) == 1, (a1_seqs, a2_seqs)
        assert len(message_seqs(got["b1"], sent_id)) == 1
        ids = {m["message"]["id"] for frames in got.values() for m in frames}
        assert len(ids) == 1
        assert got["a1"][0]["message"]["content"] == "hello from a1"

        # The other participant answers: both of ann's devices, one seq for it.
        answer = await b1.call("client.send(args[0], 'hi ann')", session_id)
        for page in (a1, a2):
            await page.wait_for(
                f"log.messages.some((m) => m.message.client_msg_id === '{answer['id']}')"
            )
        first = message_seqs(await a1.log("messages"), answer["id"])
        second = message_seqs(await a2.log("messages"), answer["id"])
        assert first == second and len(first) == 1
        for page in pages.values():
            assert await page.log("gaps") == []
            assert await page.log("errors") == []


async def send_paced(sender: Client, session_id: str, ids: list[str]) -> None:
    """Chats one after another, each acked before the next, under the node's rate limit."""
    for msg_id in ids:
        await sender.chat(session_id, f"chat {msg_id}", msg_id)
        answer = await sender.until(lambda f, i=msg_id: f.get("id") == i)  # type: ignore[misc]
        assert answer["type"] == "ack", answer
        await asyncio.sleep(SEND_GAP)


async def test_a_killed_node_moves_the_page_without_gap_or_duplicate(
    cluster: Cluster, browser: Browser
) -> None:
    # More chats to one user than the per-recipient burst (FANOUT_PEER_BURST, 30) allows.
    steady = {"FANOUT_PEER_RATE": "50"}
    node1, node2 = await asyncio.gather(
        cluster.node("node-1", **steady), cluster.node("node-2", **steady)
    )
    await cluster.worker()
    session_id = await create_session(node1, "ann", ["ben"], agent="human")
    ids = [f"m{i:03d}-{uuid.uuid4().hex[:6]}" for i in range(SENDS)]
    async with (
        fanout_page(browser, node1, "ann", "a1", [node2, node1]) as page,
        connect(node1, "ben", "b1") as ben,
    ):
        await page.wait_open("node-2")
        sending = asyncio.create_task(send_paced(ben, session_id, ids))
        try:
            await page.wait_for("log.messages.length >= 8")
            node2.kill()  # SIGKILL while the messages keep coming
            await page.wait_open("node-1", timeout=20)
            await asyncio.wait_for(sending, SENDS * 1.0)
        finally:
            sending.cancel()
        await page.wait_for(f"log.messages.length >= {SENDS}", timeout=20)
        welcomes = await page.log("welcomes")
        assert [w["node_id"] for w in welcomes] == ["node-2", "node-1"]
        delivered = [m["message"]["client_msg_id"] for m in await page.log("messages")]
        assert delivered == ids  # every chat, once, in order
        seqs = await page.log("seqs")
        start = welcomes[0]["last_seq"] + 1
        assert seqs == list(range(start, start + len(seqs))), seqs  # every seq, no duplicate
        assert await page.log("gaps") == []
        resumed = await page.log("resumed")
        assert len(resumed) == 1 and resumed[0]["complete"] is True
        assert resumed[0]["from"] <= seqs[-1]


async def test_a_page_stays_connected_past_several_token_expiries(
    cluster: Cluster, browser: Browser
) -> None:
    node = await cluster.node("node-1")
    session_id = await create_session(node, "cy")
    ttl = 3
    async with fanout_page(browser, node, "cy", "c1", [node], ttl=ttl) as page:
        await page.wait_open()
        started = time.monotonic()
        # Three tokens' lifetimes: each would close the socket (1008) if not replaced.
        await page.wait_for("log.auths.length >= 3", timeout=4 * ttl)
        while time.monotonic() - started < 3 * ttl:
            await asyncio.sleep(0.2)
        assert len(await page.log("welcomes")) == 1, await page.log("closes")
        assert await page.log("closes") == []
        assert await page.call("client.state") == "open"
        auths = await page.log("auths")
        assert len({a["expires_at"] for a in auths}) == len(auths)  # a fresh token each time
        acked = await page.call("client.send(args[0], 'still here')", session_id)
        assert acked["session_id"] == session_id


async def test_typing_and_presence_reach_the_other_pages(
    cluster: Cluster, browser: Browser
) -> None:
    node1, node2 = await asyncio.gather(cluster.node("node-1"), cluster.node("node-2"))
    session_id = await create_session(node1, "dee", ["eli"])
    async with (
        fanout_page(browser, node1, "dee", "d1", [node1]) as d1,
        fanout_page(browser, node2, "eli", "e1", [node2]) as e1,
    ):
        await asyncio.gather(d1.wait_open(), e1.wait_open())
        async with fanout_page(browser, node2, "dee", "d2", [node2]) as d2:
            await d2.wait_open()
            online = await d1.wait_for(
                "log.presence.find((p) => p.device_id === 'd2' && p.status === 'online')"
            )
            assert online["user_id"] == "dee"
            assert await e1.call("client.typing(args[0], true)", session_id) is True
            for page in (d1, d2):
                typing = await page.wait_for("log.typing.find((t) => t.user_id === 'eli')")
                assert typing == {
                    "type": "typing",
                    "session_id": session_id,
                    "user_id": "eli",
                    "device_id": "e1",
                    "is_typing": True,
                }
            await d2.call("client.close()")
        offline = await d1.wait_for(
            "log.presence.find((p) => p.device_id === 'd2' && p.status === 'offline')"
        )
        assert offline["user_id"] == "dee"
        assert await e1.log("presence") == []  # presence is for the user's own devices


async def test_a_reloaded_page_resumes_from_local_storage_and_pages_history(
    cluster: Cluster, browser: Browser
) -> None:
    short_log = {"FANOUT_USER_LOG_MAXLEN": "6"}  # the user's delivery log keeps 6 seqs
    node = await cluster.node("node-1", **short_log)
    await cluster.worker(**short_log)
    session_id = await create_session(node, "gil", ["hal"], agent="human")
    sent: list[str] = []

    async def hal_sends(count: int) -> None:
        ids = [f"h{len(sent) + i:02d}" for i in range(count)]
        await send_paced(hal, session_id, ids)
        sent.extend(ids)

    async with (
        connect(node, "hal", "h1") as hal,
        fanout_page(browser, node, "gil", "g1", [node]) as page,
    ):
        await page.wait_open()
        await hal_sends(3)
        await page.wait_for("log.messages.length === 3")
        last = (await page.log("seqs"))[-1]
        await page.call("client.close()")

        # Two messages while the page is gone; the reloaded page's new client resumes
        # from the seq it left in localStorage and gets exactly those two.
        await hal_sends(2)
        await page.load()
        await page.wait_for("log.resumed.length === 1")
        assert await page.log("resumed") == [
            {"type": "resumed", "from": last + 1, "to": last + 2, "complete": True}
        ]
        assert [m["message"]["client_msg_id"] for m in await page.log("messages")] == sent[3:]
        assert await page.log("seqs") == [last + 1, last + 2]
        await page.call("client.close()")

        # More missed than the log holds: `resumed.complete` is false, and the history
        # pages (newest first) have every message.
        await hal_sends(10)
        await page.load()
        await page.wait_for("log.resumed.length === 1")
        resumed = (await page.log("resumed"))[0]
        assert resumed["complete"] is False
        pages = await page.call(
            "(async () => { const pages = [];"
            " for await (const p of client.historyPages(args[0], { limit: 4 }))"
            " pages.push(p.items.map((m) => m.client_msg_id));"
            " return pages; })()",
            session_id,
        )
        assert [len(p) for p in pages] == [4, 4, 4, 3]
        assert [msg_id for p in pages for msg_id in p] == sent[::-1]


async def test_a_draining_node_moves_the_page_at_once_and_a_kick_stops_it(
    cluster: Cluster, browser: Browser
) -> None:
    node1, node2 = await asyncio.gather(cluster.node("node-1"), cluster.node("node-2"))
    # A back-off this long would outlast the test: only the 1001 path reconnects in time.
    slow = {"base": 30.0, "max": 30.0}
    async with fanout_page(browser, node1, "ivy", "i1", [node2, node1], backoff=slow) as page:
        await page.wait_open("node-2")
        node2.terminate()  # SIGTERM: the node drains, closing sockets with 1001
        await page.wait_open("node-1")
        assert [c["code"] for c in await page.log("closes")] == [1001]

        # An admin kicks the user (1008): the page stops and says so, and stays closed.
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{node1.url}/admin/users/ivy/disconnect",
                headers={"Authorization": f"Bearer {token('root', roles=['admin'])}"},
            ) as resp,
        ):
            assert resp.status == 200
        await page.wait_for("client.state === 'closed'")
        closes = await page.log("closes")
        assert [c["code"] for c in closes] == [1001, 1008]
        await asyncio.sleep(1.0)  # time enough for a reconnect it must not make
        assert len(await page.log("welcomes")) == 2
        assert await page.call("client.state") == "closed"


HTTP_TOUR = """(async () => {
  const made = await client.createSession({ participants: ["kit"], agent: "human" });
  const got = await client.getSession(made.id);
  const listed = await client.listSessions({ limit: 10 });
  const running = await client.updateSession(made.id, { status: "running" });
  const added = await client.addParticipant(made.id, "lou");
  await client.removeParticipant(made.id, "lou");
  const history = await client.history(made.id, { limit: 5 });
  let missing = null;
  try { await client.getSession("00000000-0000-0000-0000-000000000000"); }
  catch (error) { missing = { code: error.code, status: error.status }; }
  await client.deleteSession(made.id);
  let deleted = null;
  try { await client.getSession(made.id); } catch (error) { deleted = error.status; }
  return {
    made, got, listed: listed.items.map((s) => s.id), running: running.status,
    added: added.participants, history, missing, deleted,
  };
})()"""


async def test_http_helpers_from_another_origin_past_a_dead_node(
    cluster: Cluster, browser: Browser
) -> None:
    node1 = await cluster.node("node-1")
    # node-2 allows only pages from node-1's origin (CORS, SPEC §6).
    node2 = await cluster.node("node-2", FANOUT_ALLOWED_ORIGINS=node1.url)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: calls go on to node-2
    async with fanout_page(browser, node1, "jo", "j1", [dead, node2]) as page:
        tour = await page.call(HTTP_TOUR)
        made = tour["made"]
        assert made["owner"] == "jo" and made["participants"] == ["jo", "kit"]
        assert tour["got"] == made
        assert made["id"] in tour["listed"]
        assert tour["running"] == "running"
        assert sorted(tour["added"]) == ["jo", "kit", "lou"]
        assert tour["history"] == {"items": [], "next": None}
        assert tour["missing"] == {"code": "NOT_FOUND", "status": 404}
        assert tour["deleted"] == 404
        await page.wait_open("node-2")  # the socket, too, went on past the dead URL

    # The same calls from an origin node-2 does not allow are blocked by the browser.
    other_origin = node1.url.replace("127.0.0.1", "localhost")
    async with fanout_page(browser, other_origin, "jo", "j2", [node2]) as page:
        refused = await page.call("client.listSessions().then(() => null, (error) => error.code)")
        assert refused == "UNAVAILABLE"  # no node answered in a way the page may read


async def test_a_send_the_dead_node_never_acked_is_sent_again_and_stored_once(
    cluster: Cluster, browser: Browser, database_url: str
) -> None:
    node1, node2 = await asyncio.gather(cluster.node("node-1"), cluster.node("node-2"))
    await cluster.worker()
    session_id = await create_session(node1, "kai", agent="human")
    async with fanout_page(browser, node1, "kai", "k1", [node2, node1]) as page:
        await page.wait_open("node-2")
        node2.popen.send_signal(signal.SIGSTOP)  # it reads nothing from now on
        await page.call("(window.pending = client.send(args[0], 'across'), null)", session_id)
        await asyncio.sleep(0.3)
        node2.kill()
        # Resolved by node-1's ack of the retry, or refused here after 15 s.
        acked = await page.call(
            "Promise.race([window.pending, new Promise((_, no) =>"
            " setTimeout(() => no(new Error('no ack within 15 s')), 15000))])"
        )
        await page.wait_open("node-1")
        await page.wait_for("log.messages.length >= 1")
        await asyncio.sleep(0.5)  # time for a second copy, if one were made
        assert [m["message"]["client_msg_id"] for m in await page.log("messages")] == [acked["id"]]
    stored = await messages_in_db(database_url, session_id)
    assert [row["client_msg_id"] for row in stored] == [acked["id"]]
