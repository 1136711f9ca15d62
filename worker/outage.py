"""Riding out a Redis or Postgres outage in place (SPEC §2: input is never lost).

A consumer whose backing service is down keeps its partition, its entries in hand and
its place in the stream, and retries: with capped exponential back-off and jitter
(`retry_pacing`, common/backoff.py), so the consumers of a cluster do not all come back
in the same millisecond, and with one
WARNING when the outage starts and one per `REPORT_EVERY` seconds while it lasts, not
one per retry (hundreds of entries in flight each retry on their own).
"""

from __future__ import annotations

import logging
import time

from common.backoff import Backoff

log = logging.getLogger("fanout.worker")

FIRST_DELAY = 0.1
MAX_DELAY = 5.0
REPORT_EVERY = 10.0


def retry_pacing() -> Backoff:
    """The back-off of one retrying activity of a consumer."""
    return Backoff(first=FIRST_DELAY, cap=MAX_DELAY)


class OutageLog:
    """Logs the outages seen by one activity of a partition (`what`): at most one WARNING
    per `every` seconds, however many retries and however many short outages (after a
    cut, each stale pooled connection fails once more); an INFO when a reported outage
    ends. Activities get one each: the stream loop may be fine while the entries it hands
    out still fail (Postgres down), and one must not end the other's outage."""

    def __init__(self, partition: int, what: str, *, every: float = REPORT_EVERY) -> None:
        self._partition = partition
        self._what = what
        self._every = every
        self._since: float | None = None  # monotonic start of the outage, None: no outage
        self._reported_at = -every  # the first failure is reported at once
        self._reported = False  # this outage has been reported
        self._retries = 0  # failures since the last report

    @property
    def ongoing(self) -> bool:
        return self._since is not None

    def failed(self, exc: BaseException, retry_in: float) -> None:
        """A call failed because a service is down; it is retried in `retry_in` seconds."""
        now = time.monotonic()
        self._retries += 1
        if self._since is None:
            self._since = now
            self._reported = False
        if now - self._reported_at < self._every:
            return
        log.warning(
            "partition %d: %s: backing service unavailable for %.1fs (%s: %s);"
            " %d failures since the last report, retrying in place, next in %.1fs",
            self._partition,
            self._what,
            now - self._since,
            type(exc).__name__,
            exc,
            self._retries,
            retry_in,
        )
        self._reported_at = now
        self._reported = True
        self._retries = 0

    def recovered(self) -> None:
        """A call succeeded: the outage, if there was one, is over."""
        if self._since is not None and self._reported:
            log.info(
                "partition %d: %s: backing services answer again after %.1fs",
                self._partition,
                self._what,
                time.monotonic() - self._since,
            )
        self._since = None
