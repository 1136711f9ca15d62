"""The expiry sweeper: one at a time across the cluster, whichever worker holds its lease.

Every worker runs one; only the holder of a Redis lease (`SET NX PX`, renewed
every third of the lease time and between batches) sweeps. A sweep expires the
open sessions whose TTL passed, in batches (`FOR UPDATE SKIP LOCKED`, so a
session a worker is writing to is left for the next sweep), tells their devices,
and announces any change whose `session` frame a crash or an outage left unsent.
Each sweep is recorded in a short Redis list so operators (and tests) can see who
swept, when, and what.
"""

from __future__ import annotations

import asyncio
import logging
import time

import orjson
import redis.asyncio as aioredis

from common.store.sessions import SessionChanges
from common.transport.keys import Keys
from common.transport.lease import Leases

log = logging.getLogger("fanout.sweeper")

BATCH = 500
# Batches per sweep: bounds one sweep's time; what is left waits for the next one.
MAX_BATCHES = 20
# A change younger than this is still being announced by whoever made it.
ANNOUNCE_GRACE = 2.0
SWEEP_LOG_LENGTH = 100


class ExpirySweeper:
    """Expires overdue sessions while this worker holds the sweeper lease."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        changes: SessionChanges,
        *,
        worker_id: str,
        interval: float,
        lease_ttl: float,
    ) -> None:
        self._redis = redis
        self._lease = keys.sweeper_lease
        self._log = keys.sweeps
        self._changes = changes
        self._worker_id = worker_id
        self._interval = interval
        self._leases = Leases(redis, worker_id, lease_ttl)
        self.holding = False
        self.sweeps = 0

    async def run(self) -> None:
        """Hold the lease when free and sweep every interval; until cancelled."""
        renew_every = self._leases.ttl_ms / 3000
        due = time.monotonic()
        held = False
        while True:
            try:
                held = await self._hold()
                if held and time.monotonic() >= due:
                    due = time.monotonic() + self._interval
                    await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Postgres or Redis down: the next tick tries again; if the lease lapses
                # meanwhile another worker may take over, which is fine.
                log.warning("expiry sweep failed: %r", exc)
            # Wake for whichever comes first: the next renewal or the next sweep (which,
            # for a standby, is its next try at a lease that may have been released).
            next_sweep = max(0.0, due - time.monotonic()) if held else self._interval
            pause = min(renew_every, next_sweep)
            await asyncio.sleep(pause)

    async def sweep(self) -> int:
        """One sweep (the caller holds the lease); the number of sessions expired."""
        started = time.time()
        expired = announced = 0
        for _ in range(MAX_BATCHES):
            batch = await self._changes.expire_overdue(BATCH)
            expired += len(batch)
            if len(batch) < BATCH:
                break
            # A sweep that outlives its lease stops rather than overlap the next holder's.
            if not await self._hold():
                break
        if self.holding:
            announced = await self._changes.announce_overdue(older_than=ANNOUNCE_GRACE, limit=BATCH)
        self.sweeps += 1
        if expired or announced:
            log.info("sweep: %d sessions expired, %d late announcements", expired, announced)
        record = {
            "worker": self._worker_id,
            "started": started,
            "finished": time.time(),
            "expired": expired,
            "announced": announced,
        }
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.lpush(self._log, orjson.dumps(record))
            pipe.ltrim(self._log, 0, SWEEP_LOG_LENGTH - 1)
            await pipe.execute()
        return expired

    async def release(self) -> None:
        """Give the lease up (graceful stop) so another worker sweeps at once."""
        if self.holding:
            self.holding = False
            await self._leases.release(self._lease)

    async def _hold(self) -> bool:
        """Renew the lease if held, else try to take it; True while this worker holds it."""
        held = await self._leases.hold(self._lease)
        if held != self.holding:
            log.log(
                logging.INFO if held else logging.WARNING,
                "holding the sweeper lease" if held else "lost the sweeper lease",
            )
        self.holding = held
        return held
