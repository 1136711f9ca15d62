"""The webhook dispatcher: outbox events to FANOUT_WEBHOOK_URL, signed, at least once.

One at a time across the cluster: every worker runs one, and only the holder of
the Redis lease `lease:webhooks` delivers (a second one would race it for the same
session's events and break their order). The holder keeps up to
FANOUT_WEBHOOK_CONCURRENCY deliveries in flight, one per session at most: a round
reads, in one query, the due head of each free session's queue with up to RUN events
after it (common/store/outbox.py), and one task per session sends them in order, each
only once the one before is delivered; a failed one ends the run. The delivered events
are removed together, one DELETE per round for all sessions, before those sessions are
read again; rounds are at least ROUND_GAP apart. So a busy outbox costs two queries per
round, not a round trip per event (issue 17: ~0.5 ms of worker CPU per event before).

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

import redis.asyncio as aioredis

from common.backoff import Backoff
from common.config import Settings
from common.store.outbox import Outbox, OutboxEvent
from common.store.postgres import Store
from common.transport.keys import Keys
from common.transport.lease import Leases
from worker.webhooks import signing
from worker.webhooks.http import HookClient, HookError

log = logging.getLogger("fanout.webhooks")

# Seconds between readings of the oldest undelivered event's age (a metric).
AGE_EVERY = 1.0
# Events of one session read in one round and sent back to back by its task: a busy
# session goes on without a query per event, and cannot keep a slot for long.
RUN = 32
# Shortest time between dispatch rounds: deliveries that end meanwhile share the next
# round's DELETE and scan instead of a round each.
ROUND_GAP = 0.02
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
        # Deliveries in flight, by session: one per session keeps its events in order. A
        # session stays here after its task ends until its delivered events are deleted.
        self._inflight: dict[str, asyncio.Task[list[int]]] = {}
        self._wake = asyncio.Event()
        self.counts = WebhookCounts()
        self.holding = False

    async def run(self) -> None:
        """Deliver while holding the lease; until cancelled (then in-flight ones stop)."""
        http = HookClient(self._url, keep=self._limit)
        try:
            await self._loop(http)
        finally:
            tasks = list(self._inflight.values())
            for task in tasks:
                task.cancel()
            # Cancelled deliveries stay in the outbox: the next holder sends them.
            await asyncio.gather(*tasks, return_exceptions=True)
            http.close()
            if self.holding:
                self.holding = False
                with contextlib.suppress(Exception):
                    await self._leases.release(self._lease)

    async def _loop(self, http: HookClient) -> None:
        renew_at = age_at = 0.0
        poll = self._settings.webhook_poll
        # While Postgres or Redis is down the rounds space out (one warning each), up to
        # OUTAGE_PAUSE apart, instead of failing every poll interval.
        outage = Backoff(first=poll, cap=max(poll, OUTAGE_PAUSE))
        while True:
            pause = poll
            round_at = time.monotonic()
            # Cleared before reading the outbox: a delivery that ends after the read
            # wakes the next round instead of waiting out the poll interval.
            self._wake.clear()
            try:
                now = time.monotonic()
                if now >= renew_at:
                    renew_at = now + self._leases.ttl_ms / 3000
                    await self._hold()
                await self._settle()
                if self.holding:
                    free = self._limit - len(self._inflight)
                    if free > 0:
                        for run in await self._outbox.due_runs(set(self._inflight), free, RUN):
                            self._start(http, run)
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
            # Deliveries ending within the gap are settled together by the next round.
            await asyncio.sleep(max(0.0, round_at + ROUND_GAP - time.monotonic()))

    async def _settle(self) -> None:
        """Delete the events of finished runs in one statement; free their sessions."""
        finished = {s: t for s, t in self._inflight.items() if t.done()}
        if not finished:
            return
        ids: list[int] = []
        for task in finished.values():
            if task.cancelled():
                continue
            if (exc := task.exception()) is not None:
                # Its delivered events stay in the outbox and go out again.
                log.warning("webhook delivery task failed: %r", exc)
                continue
            ids += task.result()
        if ids:
            # If this fails the sessions stay busy and the next round tries again; a
            # holder dying meanwhile leaves the events to be sent again (at least once).
            await self._outbox.delivered(ids)
        for session in finished:
            del self._inflight[session]

    async def _hold(self) -> None:
        held = await self._leases.hold(self._lease)
        if held != self.holding:
            log.log(
                logging.INFO if held else logging.WARNING,
                "holding the webhook lease" if held else "lost the webhook lease",
            )
        self.holding = held

    def _start(self, http: HookClient, run: list[OutboxEvent]) -> None:
        task = asyncio.create_task(self._deliver(http, run), name=f"webhook-{run[0].id}")
        self._inflight[run[0].session_id] = task
        task.add_done_callback(lambda _: self._wake.set())

    async def _deliver(self, http: HookClient, run: list[OutboxEvent]) -> list[int]:
        """A session's events in order while they go through; the ids delivered."""
        delivered: list[int] = []
        for event in run:
            error = await self._post(http, event)
            if error is not None:
                await self._failed(event, error)
                break
            delivered.append(event.id)
            self.counts.sent += 1
        return delivered

    async def _failed(self, event: OutboxEvent, error: str) -> None:
        """Record a failed attempt: retry later, or dead-letter when too old."""
        try:
            self.counts.failed += 1
            age = time.time() - event.created_at.timestamp()
            if age >= self._settings.webhook_max_age:
                await self._outbox.dead_letter(event.id, error)
                self.counts.dead_lettered += 1
                log.warning("webhook %d (%s) dead-lettered: %s", event.id, event.type, error)
                return  # the next event is due now: the next round takes it
            await self._outbox.retry_later(event.id, error, self._delay(event.attempts))
            self.counts.retried += 1
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The outcome was not recorded: the event is still due, so it goes out again.
            log.warning("webhook %d: recording the outcome failed: %r", event.id, exc)

    async def _post(self, http: HookClient, event: OutboxEvent) -> str | None:
        """One attempt; None on a 2xx, else what went wrong."""
        body = event.body()
        headers = signing.headers(self._secret, event.id, int(time.time()), body)
        try:
            async with asyncio.timeout(self._settings.webhook_timeout):
                status = await http.post(body, headers)
        except (OSError, HookError, TimeoutError) as exc:
            return f"{type(exc).__name__}: {exc}"[:500]
        return None if 200 <= status < 300 else f"HTTP {status}"

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
