"""The demo chat page (GET /demo) in real Chromium: presence, typing, a streamed reply."""

from __future__ import annotations

import asyncio

from playwright.async_api import Page, expect

from tests.support.harness import Cluster, connect, token

REPLY_DELAY = "0.25"  # seconds between the echo assistant's chunks (FANOUT_ECHO_DELAY)
TEXT = "tell me about streaming replies in small pieces please"


async def test_the_demo_page_shows_presence_typing_and_a_streamed_reply(
    cluster: Cluster, page: Page
) -> None:
    node1, node2 = await asyncio.gather(cluster.node("node-1"), cluster.node("node-2"))
    await cluster.worker(FANOUT_ECHO_DELAY=REPLY_DELAY)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)

    # Opened as the README says, with both nodes: the API calls to node-2 are cross-origin.
    await page.goto(f"{node1.url}/demo#token={token('fay')}&nodes={node2.url},{node1.url}")
    await expect(page.locator("#state")).to_have_attribute("data-state", "open")
    await expect(page.locator("#state")).to_contain_text("node-2")
    assert "token=" not in page.url  # taken out of the address bar

    await page.fill("#participants", "gus")
    await page.click("#new-session")
    await expect(page.locator("#sessions li")).to_have_count(1)
    session_id = await page.locator("#sessions li").get_attribute("data-id")
    assert session_id is not None
    async with connect(node1, "gus", "g1") as gus, connect(node1, "fay", "phone"):
        # Another device of the page's user comes online; another participant types.
        await expect(page.locator("#presence li")).to_have_text("● phone")
        await gus.send({"type": "typing", "session_id": session_id, "is_typing": True})
        await expect(page.locator("#typing")).to_have_text("gus is typing…")
        await gus.send({"type": "typing", "session_id": session_id, "is_typing": False})
        await expect(page.locator("#typing")).to_have_text("")
    await expect(page.locator("#presence li")).to_have_count(0)
    await expect(page.locator("#text")).to_be_enabled()
    await page.fill("#text", TEXT)
    await page.click("#send")

    mine = page.locator('.message[data-role="user"]')
    await expect(mine).to_have_text(f"fay{TEXT}")
    reply = page.locator('.message[data-role="assistant"]')
    # While it streams: a partial reply, marked as streaming.
    await expect(reply).to_have_class("message streaming")
    partial = await reply.locator(".body").text_content()
    assert partial and "You said:".startswith(partial[:9]) and partial != f"You said: {TEXT}"
    # Then the stored reply replaces it, after several deltas.
    await expect(reply.locator(".body")).to_have_text(f"You said: {TEXT}")
    await expect(reply).to_have_attribute("data-final", "true")
    assert int(await reply.get_attribute("data-deltas") or 0) >= 3
    assert await reply.get_attribute("class") == "message"
    assert errors == []
