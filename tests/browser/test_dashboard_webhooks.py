"""The dashboard's webhook section in a real Chromium: the backlog and the dead letters."""

from __future__ import annotations

from playwright.async_api import Page, expect

from tests.support.api import ADMIN
from tests.support.harness import Cluster, connect, create_session, is_type
from tests.support.webhook_receiver import HOOK_SECRET, hook_settings, receiving

WAIT_MS = 15_000


async def test_dashboard_lists_webhook_dead_letters(cluster: Cluster, page: Page) -> None:
    async with receiving(HOOK_SECRET) as rx:
        rx.failing = True  # every attempt is a 500: after a second, dead letters
        hooks = hook_settings(rx.url, FANOUT_WEBHOOK_MAX_AGE="1")
        node = await cluster.node(**hooks)
        await cluster.worker(**hooks)
        session_id = await create_session(node, "ann", agent="human")
        async with connect(node, "ann", "a1") as ann:
            await ann.chat(session_id, "never delivered", "x1")
            await ann.until(is_type("message", message__client_msg_id="x1"))
        await page.goto(f"{node.url}/dashboard")
        await page.fill("#token", ADMIN)
        await page.click("#login-button")
        summary = page.locator("#webhooks-summary")
        await expect(summary).to_have_attribute("data-total", "2", timeout=WAIT_MS)
        await expect(summary).to_contain_text("0 waiting")
        rows = page.locator("#dead-letters tbody tr")
        await expect(rows).to_have_count(2)
        await expect(rows.filter(has_text="message.created")).to_contain_text(session_id)
        await expect(rows.filter(has_text="session.updated")).to_contain_text("HTTP 500")
