"""Per-socket deadlines kept node-wide: token expiry (1008) and the heartbeat.

A timer per socket costs a node a few hundred bytes per idle connection; here each
socket costs a set entry and the node has one timer (or task) per kind.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import time
from typing import Protocol

from common.protocol import CloseCode


class Expiring(Protocol):
    """What the timer needs of a connection (node.ws.connection.Connection)."""

    @property
    def expires_at(self) -> float: ...

    def close(self, code: int, reason: str) -> None: ...


class Peer(Protocol):
    """What the heartbeat needs of a connection (node.ws.connection.Connection)."""

    @property
    def heard_at(self) -> float: ...

    @property
    def pinged(self) -> bool: ...

    def ping(self) -> None: ...

    def cut(self) -> None: ...


class TokenExpiry:
    """Connections bucketed by the second their token expires, and one timer for the earliest.

    A socket is closed (1008) within a second after its `exp`.
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


class Heartbeat:
    """Pings each socket silent for `interval` seconds and cuts one silent for twice that.

    Every socket is looked at every quarter interval: a ping goes out 1 to 1.25
    intervals into a silence, a cut comes 2 to 2.25 intervals into it (SPEC §3). The
    sockets are dealt into SLICES groups and each tick looks at one group, so the
    pings of thousands of sockets that answered together (every idle socket does, after
    the first round) go out spread over the quarter, not as one burst that stalls the
    loop for every delivery behind it.
    """

    SLICES = 8

    def __init__(self) -> None:
        self._groups: list[set[Peer]] = [set() for _ in range(self.SLICES)]
        self._dealt = 0
        self._turn = 0
        self._interval = 30.0
        self._timer: asyncio.TimerHandle | None = None

    def watch(self, peer: Peer, interval: float) -> None:
        self._groups[self._dealt % self.SLICES].add(peer)
        self._dealt += 1
        self._interval = interval
        if self._timer is None:
            self._arm()

    def forget(self, peer: Peer) -> None:
        for group in self._groups:
            group.discard(peer)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self) -> None:
        tick = self._interval / 4 / self.SLICES
        self._timer = asyncio.get_running_loop().call_later(tick, self._tick)

    def _tick(self) -> None:
        self._timer = None
        group = self._groups[self._turn]
        self._turn = (self._turn + 1) % self.SLICES
        now = time.monotonic()
        for peer in list(group):
            silent = now - peer.heard_at
            if silent >= 2 * self._interval:
                group.discard(peer)
                peer.cut()
            elif silent >= self._interval and not peer.pinged:
                peer.ping()
        if any(self._groups):
            self._arm()
