"""The dashboard link `fanout up` prints (`/dashboard#token=...`) signs the tab in, and the
token leaves the address bar (it never went to the server: a fragment is not sent)."""

from __future__ import annotations

from playwright.async_api import Page, expect

from tests.support.api import ADMIN
from tests.support.harness import Cluster, connect
from tests.support.ops import INTERVAL


async def test_the_printed_dashboard_link_signs_in(cluster: Cluster, page: Page) -> None:
    node = await cluster.node("node-1", FANOUT_STATS_INTERVAL=INTERVAL)
    async with connect(node, "ann", "a1"), connect(node, "ann", "a2"):
        await page.goto(f"{node.url}/dashboard#token={ADMIN}")
        await expect(page.locator("#status")).to_have_attribute("data-state", "live")
        await expect(page.locator("#login")).to_be_hidden()
        assert "token" not in page.url
        assert await page.evaluate("sessionStorage.getItem('fanout.admin-token')") == ADMIN
        # Two devices of one user: one user.
        await expect(page.locator("#total-users")).to_have_attribute("data-value", "1")
        await expect(page.locator("#total-connections")).to_have_attribute("data-value", "2")
