"""Token expiry: one timer for the whole node closes every socket whose token has expired."""

from __future__ import annotations

import asyncio
import heapq
import math
import time
from typing import Protocol

from common.protocol import CloseCode


class Expiring(Protocol):
    """What the timer needs of a connection (node.connection.Connection)."""

    @property
    def expires_at(self) -> float: ...

    def close(self, code: int, reason: str) -> None: ...


class TokenExpiry:
    """Connections bucketed by the second their token expires, and one timer for the earliest.

    A timer per connection costs a node a few hundred bytes per idle socket; a bucket
    costs one set entry. A socket is closed (1008) within a second after its `exp`.
    """

    def __init__(self) -> None:
        self._buckets: dict[int, set[Expiring]] = {}
        # The seconds that have a bucket (or had one, emptied before it was due), as a
        # heap, and as a set so that a bucket made again is not pushed twice.
        self._due: list[int] = []
        self._queued: set[int] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._armed_for = math.inf

    def watch(self, conn: Expiring) -> None:
        """Close `conn` with 1008 once its token has expired, unless it is forgotten first."""
        if conn.expires_at == math.inf:
            return
        second = math.ceil(conn.expires_at)
        self._buckets.setdefault(second, set()).add(conn)
        if second not in self._queued:
            self._queued.add(second)
            heapq.heappush(self._due, second)
        if second < self._armed_for:
            self._arm(second)

    def forget(self, conn: Expiring) -> None:
        """The socket is gone: drop it (an emptied bucket's second is skipped when due)."""
        if conn.expires_at == math.inf:
            return
        second = math.ceil(conn.expires_at)
        bucket = self._buckets.get(second)
        if bucket is not None:
            bucket.discard(conn)
            if not bucket:
                del self._buckets[second]

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._armed_for = None, math.inf

    def _arm(self, second: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        # Token times are wall-clock, the loop's are monotonic: the delay is converted
        # once; a timer that fires early (clock stepped back) finds nothing due, re-arms.
        self._timer = loop.call_at(loop.time() + max(second - time.time(), 0.0), self._expire)
        self._armed_for = second

    def _expire(self) -> None:
        self._timer, self._armed_for = None, math.inf
        now = time.time()
        while self._due and self._due[0] <= now:
            second = heapq.heappop(self._due)
            self._queued.discard(second)
            for conn in self._buckets.pop(second, ()):
                conn.close(CloseCode.POLICY, "token expired")
        if self._due:
            self._arm(self._due[0])
