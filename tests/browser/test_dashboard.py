"""The dashboard in a real headless Chromium (issue 6): sign in, live numbers, drain, a kill."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

from playwright.async_api import Page, expect

from common.transport.keys import Keys
from tests.support.api import ADMIN
from tests.support.harness import ROOT, Cluster, connect, create_session
from tests.support.ops import INTERVAL, TTL, chatting, stalled_client

SCREENSHOTS = Path(os.environ.get("FANOUT_SCREENSHOTS", ROOT / ".fanout-data" / "screenshots"))
WAIT_MS = 10_000


def row(page: Page, process_id: str) -> Any:
    """A process's row in the dashboard's tables."""
    return page.locator(f'tr[data-id="{process_id}"]')


def page_errors(page: Page) -> list[str]:
    """Script errors, console errors and failed requests of the page, as they happen."""
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    return errors


async def test_dashboard_shows_the_cluster_live(
    cluster: Cluster, page: Page, redis: Any, namespace: str
) -> None:
    fast = {"FANOUT_STATS_INTERVAL": INTERVAL}
    node1, node2, node3 = await asyncio.gather(
        cluster.node("node-1", **fast),
        cluster.node("node-2", **fast),
        cluster.node(
            "node-3", **fast, FANOUT_DRAIN_TIMEOUT="8", FANOUT_SEND_QUEUE_BYTES=str(64 << 20)
        ),
    )
    await asyncio.gather(
        cluster.worker("worker-1", FANOUT_STATS_INTERVAL=INTERVAL),
        cluster.worker("worker-2", FANOUT_STATS_INTERVAL=INTERVAL),
    )
    session_id = await create_session(node1, "ann", ["ben"])
    errors = page_errors(page)
    status = page.locator("#status")

    async with connect(node1, "ann", "a1") as ann, connect(node2, "ben", "b1"):
        await page.goto(f"{node1.url}/dashboard")
        await expect(page.locator("#login")).to_be_visible()
        await page.fill("#token", ADMIN)
        await page.click("#login-button")
        await expect(status).to_have_attribute("data-state", "live", timeout=WAIT_MS)
        assert await page.evaluate("sessionStorage.getItem('fanout.admin-token')") == ADMIN

        async with chatting(ann, session_id):
            for process_id in ("node-1", "node-2", "node-3", "worker-1", "worker-2"):
                await expect(row(page, process_id)).to_have_attribute(
                    "data-state", "live", timeout=WAIT_MS
                )
            for total in ("total-messages-in-per-s", "total-messages-out-per-s"):
                rate = await page.wait_for_function(
                    "(id) => Number(document.getElementById(id).dataset.value) > 0"
                    " && document.getElementById(id).dataset.value",
                    arg=total,
                    timeout=WAIT_MS,
                )
                assert float(await rate.json_value()) > 0, total

            # A node dies: its row goes "gone" once its stats expire, and a banner says so.
            node2.kill()
            await expect(row(page, "node-2")).to_have_attribute(
                "data-state", "gone", timeout=(TTL + 4) * 1000
            )
            await expect(page.locator("#banner")).to_contain_text("node-2")

            # A graceful drain, held open by a client on a stalled network. The node gives
            # such a peer about 3 s (node/app.py PEER_CLOSE_GRACE, then the cleanup's end
            # of its stream), so the drain is watched right after the SIGTERM.
            sock = await asyncio.to_thread(stalled_client, node3.port or 0, "cleo")
            try:
                filler = b'{"type":"typing","pad":"' + b"x" * (1 << 20) + b'"}'
                await asyncio.sleep(0.5)
                for _ in range(12):
                    await redis.publish(Keys(namespace).user_channel("cleo"), filler)
                await asyncio.sleep(0.5)
                node3.popen.send_signal(signal.SIGTERM)
                await expect(row(page, "node-3")).to_have_attribute(
                    "data-state", "draining", timeout=WAIT_MS
                )
                await expect(row(page, "node-2")).to_have_attribute("data-state", "gone")
                SCREENSHOTS.mkdir(parents=True, exist_ok=True)
                await page.screenshot(path=SCREENSHOTS / "dashboard.png")
                print(f"dashboard screenshot: {SCREENSHOTS / 'dashboard.png'}")
            finally:
                sock.close()

        # The node serving the page goes away: the page says the API is unreachable.
        node1.kill()
        await expect(status).to_have_attribute("data-state", "unreachable", timeout=WAIT_MS)
        await expect(page.locator("#banner")).to_be_visible()
        await page.screenshot(path=SCREENSHOTS / "dashboard-unreachable.png")
    # The page's own requests fail once node-1 is gone; its script must not.
    assert [e for e in errors if "Failed to load resource" not in e] == [], errors
