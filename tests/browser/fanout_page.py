"""A page in real Chromium running fanout.js against real nodes, and what it saw.

The page is opened on a node's origin and imports /client/fanout.js from it; every
event the client emits is recorded in `window.fanout.log` for the test to read. Tokens
come from the test through an exposed function (`getToken` mints a fresh one each call).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from playwright.async_api import Browser, Page
from playwright.async_api import TimeoutError as PlaywrightTimeout

from tests.support.harness import Proc, token

# Runs in the page: builds the client, records its events, connects.
SETUP = """
async ({urls, deviceId, backoff}) => {
  const { FanoutClient } = await import("/client/fanout.js");
  const log = {
    states: [], welcomes: [], messages: [], seqs: [], deltas: [], typing: [],
    presence: [], auths: [], resumed: [], gaps: [], errors: [], closes: [],
  };
  const client = new FanoutClient({
    urls, deviceId, backoff, getToken: () => window.mintToken(),
  });
  client.on("state", (e) => log.states.push(e.state));
  client.on("welcome", (f) => log.welcomes.push(f));
  for (const kind of ["message", "session", "read", "notification"]) {
    client.on(kind, (f) => { if (typeof f.seq === "number") log.seqs.push(f.seq); });
  }
  client.on("message", (f) => log.messages.push(f));
  client.on("message_delta", (f) => log.deltas.push(f));
  client.on("typing", (f) => log.typing.push(f));
  client.on("presence", (f) => log.presence.push(f));
  client.on("auth", (f) => log.auths.push(f));
  client.on("resumed", (f) => log.resumed.push(f));
  client.on("gap", (e) => log.gaps.push(e));
  client.on("error", (e) => log.errors.push({ code: e.code, message: e.message }));
  client.on("close", (e) => log.closes.push(e));
  window.fanout = { client, log };
  await client.connect();
}
"""


class FanoutPage:
    """One device's page: its client (`window.fanout.client`) and its event log."""

    def __init__(self, page: Page, origin: str, setup: dict[str, Any]) -> None:
        self.page = page
        self._origin = origin
        self._setup = setup

    async def load(self) -> None:
        """(Re)load the page and start a new client: only localStorage is left of the last."""
        await self.page.goto(f"{self._origin}/healthz")
        await self.page.evaluate(SETUP, self._setup)

    async def log(self, name: str) -> Any:
        return await self.page.evaluate(f"window.fanout.log.{name}")

    async def call(self, expression: str, *args: Any) -> Any:
        """Evaluate `expression` (which sees `client` and `args`) in the page; its result."""
        script = f"async (args) => {{ const client = window.fanout.client; return {expression}; }}"
        return await self.page.evaluate(script, list(args))

    async def wait_for(self, condition: str, timeout: float = 15) -> Any:
        """Wait until `condition` (which sees `client` and `log`) is truthy; its value."""
        script = (
            "() => { const client = window.fanout.client, log = window.fanout.log; "
            f"return {condition}; }}"
        )
        try:
            handle = await self.page.wait_for_function(script, timeout=timeout * 1000, polling=50)
        except PlaywrightTimeout:
            seen = await self.page.evaluate(
                "({states: window.fanout.log.states, closes: window.fanout.log.closes,"
                " errors: window.fanout.log.errors, nodes: window.fanout.log.welcomes"
                ".map((w) => w.node_id)})"
            )
            raise AssertionError(
                f"not within {timeout}s: {condition}; the page saw {seen}"
            ) from None
        return await handle.json_value()

    async def wait_open(self, node_id: str | None = None, timeout: float = 15) -> None:
        check = "client.state === 'open'"
        if node_id is not None:
            check += f" && client.nodeId === {json.dumps(node_id)}"
        await self.wait_for(check, timeout)


@asynccontextmanager
async def fanout_page(
    browser: Browser,
    origin: Proc | str,
    user_id: str,
    device_id: str,
    nodes: Sequence[Proc | str],
    *,
    ttl: float = 3600,
    backoff: dict[str, float] | None = None,
) -> AsyncIterator[FanoutPage]:
    """A page on `origin` (a node, or the base URL of one) in a context of its own (its own
    localStorage), whose client connects to `nodes` (or URLs) in order, with tokens of
    `user_id` living `ttl` seconds."""
    context = await browser.new_context()
    try:
        page = await context.new_page()
        await page.expose_function("mintToken", lambda: token(user_id, ttl=ttl))
        setup = {
            "urls": [node if isinstance(node, str) else node.url for node in nodes],
            "deviceId": device_id,
            "backoff": backoff or {"base": 0.1, "max": 1.0},
        }
        loaded = FanoutPage(page, origin if isinstance(origin, str) else origin.url, setup)
        await loaded.load()
        yield loaded
    finally:
        await context.close()
