"""TokenExpiry: one node-wide timer closes each socket with 1008 once its token has expired."""

from __future__ import annotations

import asyncio
import time

from node.ws.timers import Heartbeat, TokenExpiry


class FakeConn:
    def __init__(self, expires_at: float) -> None:
        self.expires_at = expires_at
        self.closed: tuple[int, str] | None = None
        self.closed_at = 0.0

    def close(self, code: int, reason: str) -> None:
        self.closed, self.closed_at = (code, reason), time.time()


async def test_each_connection_closes_1008_within_a_second_of_its_expiry() -> None:
    expiry = TokenExpiry()
    now = time.time()
    late, soon = FakeConn(now + 1.6), FakeConn(now + 0.2)
    expiry.watch(late)
    expiry.watch(soon)  # earlier: the timer is re-armed for it
    await asyncio.sleep(1.3)
    assert soon.closed == (1008, "token expired")
    assert late.closed is None
    await asyncio.sleep(1.3)
    assert late.closed == (1008, "token expired")
    for conn in (soon, late):
        assert conn.expires_at <= conn.closed_at < conn.expires_at + 1.1
    expiry.close()


async def test_a_forgotten_connection_is_not_closed() -> None:
    expiry = TokenExpiry()
    now = time.time()
    gone, stays = FakeConn(now + 0.1), FakeConn(now + 0.1)
    for conn in (gone, stays):
        expiry.watch(conn)
    expiry.forget(gone)
    expiry.forget(gone)  # twice is harmless
    await asyncio.sleep(1.2)
    assert gone.closed is None
    assert stays.closed is not None
    # A bucket emptied and made again for the same second is still due once.
    again = FakeConn(now + 1.5)
    expiry.watch(again)
    expiry.forget(again)
    expiry.watch(again)
    await asyncio.sleep(1.5)
    assert again.closed is not None
    expiry.close()


async def test_no_expiry_and_close_cancel_the_timer() -> None:
    expiry = TokenExpiry()
    forever, pending = FakeConn(float("inf")), FakeConn(time.time() + 0.1)
    expiry.watch(forever)
    expiry.watch(pending)
    expiry.close()
    await asyncio.sleep(1.1)
    assert forever.closed is None and pending.closed is None


class FakePeer:
    def __init__(self) -> None:
        self.heard_at = time.monotonic()
        self.pinged = False
        self.pings = 0
        self.cut_after: float | None = None

    def ping(self) -> None:
        self.pinged, self.pings = True, self.pings + 1

    def cut(self) -> None:
        self.cut_after = time.monotonic() - self.heard_at

    def heard(self) -> None:
        self.heard_at, self.pinged = time.monotonic(), False


async def test_heartbeat_pings_once_then_cuts_a_silent_peer_after_twice_the_interval() -> None:
    heartbeat = Heartbeat()
    silent, alive = FakePeer(), FakePeer()
    heartbeat.watch(silent, 0.2)
    heartbeat.watch(alive, 0.2)
    for _ in range(10):  # 0.6 s, the alive peer answers every 0.06 s
        await asyncio.sleep(0.06)
        alive.heard()
    assert silent.pings == 1, "one ping per silence"
    assert silent.cut_after is not None and 0.4 <= silent.cut_after < 0.55
    assert alive.cut_after is None and alive.pings == 0
    heartbeat.forget(alive)
    await asyncio.sleep(0.1)
    heartbeat.close()


async def test_peers_silent_together_are_pinged_in_slices_not_one_burst() -> None:
    heartbeat = Heartbeat()
    peers = [FakePeer() for _ in range(80)]
    for peer in peers:
        peer.pinged = False
        heartbeat.watch(peer, 0.8)
    pinged_at: dict[int, float] = {}
    started = time.monotonic()
    while len(pinged_at) < len(peers) and time.monotonic() - started < 3:
        await asyncio.sleep(0.005)
        for i, peer in enumerate(peers):
            if peer.pings and i not in pinged_at:
                pinged_at[i] = time.monotonic() - started
    heartbeat.close()
    assert len(pinged_at) == 80, "every silent peer is pinged"
    # 1 to 1.25 intervals into the silence; 0.1 s of slack for a busy machine's timers
    # (a fresh-machine run missed the 0.05 s it had), still short of the next quarter.
    assert all(0.8 <= t <= 0.8 * 1.25 + 0.1 for t in pinged_at.values()), "within the quarter"
    moments = sorted({round(t, 2) for t in pinged_at.values()})
    assert len(moments) >= Heartbeat.SLICES - 1, f"one burst, not slices: {moments}"
