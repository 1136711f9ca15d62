"""A local webhook receiver for tests and the benchmark: records what fanout POSTs.

It listens on loopback, checks every delivery's signature the way README "Webhooks"
tells a receiver to, and can misbehave on purpose: answer 500 to the first attempts
of each event, hang, or refuse everything.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from worker.webhooks.signing import verify

HOOK_SECRET = "webhook-secret-for-tests"


def hook_settings(url: str, **more: str) -> dict[str, str]:
    """Settings of a node or worker that sends webhooks to `url`, retrying quickly."""
    return {
        "FANOUT_WEBHOOK_URL": url,
        "FANOUT_WEBHOOK_SECRET": HOOK_SECRET,
        "FANOUT_WEBHOOK_POLL": "0.05",
        "FANOUT_WEBHOOK_RETRY_BASE": "0.05",
        "FANOUT_WEBHOOK_RETRY_CAP": "0.3",
        "FANOUT_WEBHOOK_TIMEOUT": "2",
        **more,
    }


@dataclass
class Delivery:
    """One attempt as the receiver saw it."""

    event_id: str
    body: dict[str, Any]
    signed: bool
    status: int
    at: float


@dataclass
class Receiver:
    secret: str
    port: int = 0
    # Answer 500 to the first `fail_first` attempts of each event.
    fail_first: int = 0
    # Answer 500 to every attempt while set.
    failing: bool = False
    # Never answer (until the attempt times out on fanout's side) while set.
    hanging: bool = False
    attempts: list[Delivery] = field(default_factory=list)
    # Requests held open right now by `hanging`.
    hanging_now: int = 0
    _tries: Counter[str] = field(default_factory=Counter)
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    @property
    def accepted(self) -> list[dict[str, Any]]:
        """Events answered with 200, in arrival order (a re-delivery appears again)."""
        return [d.body for d in self.attempts if d.status == 200]

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.accepted if e["type"] == kind]

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        event_id = request.headers.get("Fanout-Event-Id", "")
        signed = verify(
            self.secret,
            request.headers.get("Fanout-Timestamp", ""),
            request.headers.get("Fanout-Signature", ""),
            body,
            now=time.time(),
            tolerance=300,
        )
        if self.hanging:
            # Held until fanout gives up (it closes the connection) or hanging is turned off.
            self.hanging_now += 1
            try:
                while self.hanging and not _gone(request):
                    await asyncio.sleep(0.5)  # a rare wake-up: the benchmark shares its CPU
            finally:
                self.hanging_now -= 1
            if _gone(request):
                return web.Response(status=503)  # nobody reads it; not an attempt that counts
        self._tries[event_id] += 1
        status = 200
        if self.failing or self._tries[event_id] <= self.fail_first:
            status = 500
        self.attempts.append(Delivery(event_id, orjson.loads(body), signed, status, time.time()))
        self._arrived.set()
        return web.Response(status=status)

    async def wait_for(self, done: Callable[[Receiver], bool], timeout: float = 20) -> None:
        """Until `done(self)` holds; TimeoutError with what arrived otherwise."""
        deadline = time.monotonic() + timeout
        while not done(self):
            left = deadline - time.monotonic()
            if left <= 0:
                kinds = Counter(e["type"] for e in self.accepted)
                raise TimeoutError(f"webhooks: {len(self.attempts)} attempts, accepted {kinds}")
            self._arrived.clear()
            try:
                async with asyncio.timeout(min(left, 0.5)):
                    await self._arrived.wait()
            except TimeoutError:
                pass


def _gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


@asynccontextmanager
async def receiving(secret: str, port: int = 0) -> AsyncIterator[Receiver]:
    """A receiver listening on 127.0.0.1 (`port` 0: any free port) for the block."""
    receiver = Receiver(secret)
    app = web.Application()
    app.router.add_post("/hooks", receiver.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    server = site._server
    assert server is not None
    receiver.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    try:
        yield receiver
    finally:
        await runner.cleanup()
