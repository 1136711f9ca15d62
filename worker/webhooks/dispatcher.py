"""The webhook dispatcher: outbox events to FANOUT_WEBHOOK_URL, signed, at least once.

One at a time across the cluster: every worker runs one, and only the holder of
the Redis lease `lease:webhooks` delivers (a second one would race it for the same
session's events and break their order). The holder keeps up to
FANOUT_WEBHOOK_CONCURRENCY deliveries in flight, one per session at most: the head of
a session's queue goes out, and its next event only once the head is delivered or
dead-lettered (common/store/outbox.py); a delivered event's removal fetches the
session's next one in the same round trip, and the task sends it straight away.

A delivery is a 2xx within FANOUT_WEBHOOK_TIMEOUT; anything else is retried with
capped exponential back-off (full jitter, common/backoff.py) until the event is
FANOUT_WEBHOOK_MAX_AGE old, then it is dead-lettered. An event is deleted only after
its 2xx, so a holder that dies mid-delivery leaves it for the next holder: a
receiver may see an event twice (same `Fanout-Event-Id`), never miss one.

Nothing here is on the chat path: the dispatcher reads the outbox on its own
connections and tasks, so a receiver that hangs holds only its own slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import redis.asyncio as aioredis

from common.backoff import Backoff
from common.config import Settings
from common.store.outbox import Outbox, OutboxEvent
from common.store.postgres import Store
from common.transport.keys import Keys
from common.transport.lease import Leases
from worker.webhooks import signing

log = logging.getLogger("fanout.webhooks")

# Bytes of a receiver's answer read before the connection is reused; the rest is dropped.
ANSWER_READ = 4096
# Seconds between readings of the oldest undelivered event's age (a metric).
AGE_EVERY = 1.0
# Events of one session sent back to back by one delivery task before its slot is
# given back: a busy session goes on without a new outbox scan per event, and cannot
# keep a slot from other sessions for long.
CHAIN = 32
# Longest pause between dispatch rounds while Postgres or Redis fails them.
OUTAGE_PAUSE = 5.0


@dataclass(slots=True)
class WebhookCounts:
    """What the dispatcher did, for /metrics and the stats record."""

    sent: int = 0
    failed: int = 0
    retried: int = 0
    dead_lettered: int = 0
    oldest_age: float = 0.0


class WebhookDispatcher:
    """Delivers outbox events while this worker holds the webhook lease."""

    def __init__(
        self, settings: Settings, store: Store, redis: aioredis.Redis, *, worker_id: str
    ) -> None:
        assert settings.webhook_url is not None
        assert settings.webhook_secret is not None
        self._url = settings.webhook_url
        self._secret = settings.webhook_secret
        self._settings = settings
        self._outbox = Outbox(store)
        self._leases = Leases(redis, worker_id, settings.lease_ttl)
        self._lease = Keys(settings.namespace).webhook_lease
        self._limit = settings.webhook_concurrency
        # Deliveries in flight, by session: one per session keeps its events in order.
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self.counts = WebhookCounts()
        self.holding = False

    async def run(self) -> None:
        """Deliver while holding the lease; until cancelled (then in-flight ones stop)."""
        timeout = aiohttp.ClientTimeout(total=self._settings.webhook_timeout)
        connector = aiohttp.TCPConnector(limit=self._limit)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
            try:
                await self._loop(http)
            finally:
                tasks = list(self._inflight.values())
                for task in tasks:
                    task.cancel()
                # Cancelled deliveries stay in the outbox: the next holder sends them.
                await asyncio.gather(*tasks, return_exceptions=True)
                if self.holding:
                    self.holding = False
                    with contextlib.suppress(Exception):
                        await self._leases.release(self._lease)

    async def _loop(self, http: aiohttp.ClientSession) -> None:
        renew_at = age_at = 0.0
        poll = self._settings.webhook_poll
        # While Postgres or Redis is down the rounds space out (one warning each), up to
        # OUTAGE_PAUSE apart, instead of failing every poll interval.
        outage = Backoff(first=poll, cap=max(poll, OUTAGE_PAUSE))
        while True:
            pause = poll
            # Cleared before reading the outbox: a delivery that ends after the read
            # wakes the next round instead of waiting out the poll interval.
            self._wake.clear()
            try:
                now = time.monotonic()
                if now >= renew_at:
                    renew_at = now + self._leases.ttl_ms / 3000
                    await self._hold()
                if self.holding:
                    free = self._limit - len(self._inflight)
                    if free > 0:
                        for event in await self._outbox.due(set(self._inflight), free):
                            self._start(http, event)
                    if now >= age_at:
                        age_at = now + AGE_EVERY
                        self.counts.oldest_age = await self._outbox.oldest_age()
                outage.reset()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Events wait in the outbox meanwhile; none is lost.
                pause = poll + outage.next_delay()
                log.warning("webhook dispatch round failed (next in %.1f s): %r", pause, exc)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await self._wake.wait()

    async def _hold(self) -> None:
        held = await self._leases.hold(self._lease)
        if held != self.holding:
            log.log(
                logging.INFO if held else logging.WARNING,
                "holding the webhook lease" if held else "lost the webhook lease",
            )
        self.holding = held

    def _start(self, http: aiohttp.ClientSession, event: OutboxEvent) -> None:
        task = asyncio.create_task(self._deliver(http, event), name=f"webhook-{event.id}")
        self._inflight[event.session_id] = task

        def done(_: asyncio.Task[None]) -> None:
            self._inflight.pop(event.session_id, None)
            self._wake.set()

        task.add_done_callback(done)

    async def _deliver(self, http: aiohttp.ClientSession, event: OutboxEvent) -> None:
        """A session's events, from `event` on, while they go through (at most CHAIN)."""
        for _ in range(CHAIN):
            following = await self._deliver_one(http, event)
            if following is None:
                return
            event = following

    async def _deliver_one(
        self, http: aiohttp.ClientSession, event: OutboxEvent
    ) -> OutboxEvent | None:
        """One event; the session's next one if this one was delivered and another waits."""
        error = await self._post(http, event)
        try:
            if error is None:
                following = await self._outbox.delivered(event)
                self.counts.sent += 1
                return following
            self.counts.failed += 1
            age = time.time() - event.created_at.timestamp()
            if age >= self._settings.webhook_max_age:
                await self._outbox.dead_letter(event.id, error)
                self.counts.dead_lettered += 1
                log.warning("webhook %d (%s) dead-lettered: %s", event.id, event.type, error)
                return None  # the next event is due now: the next round takes it
            await self._outbox.retry_later(event.id, error, self._delay(event.attempts))
            self.counts.retried += 1
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The outcome was not recorded: the event is still due, so it goes out again.
            log.warning("webhook %d: recording the outcome failed: %r", event.id, exc)
        return None

    async def _post(self, http: aiohttp.ClientSession, event: OutboxEvent) -> str | None:
        """One attempt; None on a 2xx, else what went wrong."""
        body = event.body()
        headers = signing.headers(self._secret, event.id, int(time.time()), body)
        try:
            async with http.post(self._url, data=body, headers=headers) as answer:
                await answer.content.read(ANSWER_READ)
                if 200 <= answer.status < 300:
                    return None
                return f"HTTP {answer.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return f"{type(exc).__name__}: {exc}"[:500]

    def _delay(self, attempts: int) -> float:
        """Seconds before attempt `attempts + 2`: the ceiling doubles per failure, capped."""
        base, cap = self._settings.webhook_retry_base, self._settings.webhook_retry_cap
        ceiling = min(cap, base * 2 ** min(attempts, 32))
        return Backoff(first=ceiling, cap=cap).next_delay()


@contextlib.asynccontextmanager
async def dispatching(
    settings: Settings, store: Store, redis: aioredis.Redis
) -> AsyncIterator[WebhookDispatcher | None]:
    """Run a dispatcher for the block when webhooks are on (None when they are off)."""
    if settings.webhook_url is None:
        yield None
        return
    dispatcher = WebhookDispatcher(settings, store, redis, worker_id=settings.node_id)
    task = asyncio.create_task(dispatcher.run(), name="webhooks")
    try:
        yield dispatcher
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
