"""The dashboard in a real headless Chromium (issue 6): sign in, live numbers, drain, a kill."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from common.transport.keys import Keys
from tests.browser.cdp import browser_page
from tests.browser.conftest import find_chromium
from tests.harness import ROOT, Cluster, connect, create_session
from tests.test_ops import ADMIN, INTERVAL, TTL, chatting, stalled_client

CHROMIUM = find_chromium()
SCREENSHOTS = Path(os.environ.get("FANOUT_SCREENSHOTS", ROOT / ".fanout-data" / "screenshots"))

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium (apt-get install chromium, or set FANOUT_CHROMIUM); .ci/run installs it",
)


def row_state(node_id: str) -> str:
    """JavaScript: the data-state of a process's row (null while it has none)."""
    return f"(document.querySelector('tr[data-id=\"{node_id}\"]')?.dataset.state ?? null)"


async def test_dashboard_shows_the_cluster_live(
    cluster: Cluster, tmp_path: Path, redis: Any, namespace: str
) -> None:
    assert CHROMIUM is not None
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

    async with (
        browser_page(CHROMIUM, tmp_path / "profile") as page,
        connect(node1, "ann", "a1") as ann,
        connect(node2, "ben", "b1"),
    ):
        await page.send("Page.navigate", url=f"{node1.url}/dashboard")
        await page.wait_for("!document.getElementById('login').hidden", what="the token form")
        await page.type_into("#token", ADMIN)
        await page.click("#login-button")
        await page.wait_for(
            "document.getElementById('status').dataset.state === 'live'", what="live status"
        )
        assert await page.evaluate("sessionStorage.getItem('fanout.admin-token')") == ADMIN

        async with chatting(ann, session_id):
            for node_id in ("node-1", "node-2", "node-3", "worker-1", "worker-2"):
                await page.wait_for(f"{row_state(node_id)} === 'live'", what=f"{node_id} live")
            rate = await page.wait_for(
                "Number(document.getElementById('total-messages-in-per-s').dataset.value) > 0"
                " && document.getElementById('total-messages-in-per-s').dataset.value",
                what="a non-zero message rate",
            )
            assert float(rate) > 0
            await page.wait_for(
                "Number(document.getElementById('total-messages-out-per-s').dataset.value) > 0",
                what="a non-zero delivery rate",
            )

            # A node dies: its row goes "gone" once its stats expire, and a banner says so.
            node2.kill()
            await page.wait_for(
                f"{row_state('node-2')} === 'gone'", timeout=TTL + 4, what="node-2 gone"
            )
            banner = await page.evaluate("document.getElementById('banner').textContent")
            assert "node-2" in banner

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
                await page.wait_for(f"{row_state('node-3')} === 'draining'", what="node-3 draining")
                assert await page.evaluate(f"{row_state('node-2')}") == "gone"
                shot = await page.screenshot(SCREENSHOTS / "dashboard.png")
                print(f"dashboard screenshot: {shot}")
            finally:
                sock.close()

        # The node serving the page goes away: the page says the API is unreachable.
        node1.kill()
        await page.wait_for(
            "document.getElementById('status').dataset.state === 'unreachable'",
            what="API unreachable shown",
        )
        assert not await page.evaluate("document.getElementById('banner').hidden")
        await page.screenshot(SCREENSHOTS / "dashboard-unreachable.png")
        assert page.errors == [], page.errors
