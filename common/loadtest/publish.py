"""`fanout` mode's publisher: logged notifications through Bus.deliver, paced or flat out.

Each frame carries its publish time (monotonic µs) as the first field after the seq,
``{"seq":N,"ts":T,...``, so receivers read both from the prefix (common/loadtest/fleet.py).
Bus.deliver returns each user's seq; the seqs published are kept as ranges, and
`account` counts, per device, which it lacks (lost), got twice or got out of order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from common.loadtest.fleet import Fleet, LoadConfig, Tally, monotonic_us
from common.loadtest.report import Report, SeqRanges

log = logging.getLogger("fanout.loadtest")

# Seconds between publishing ticks at a fixed rate (see `publish`).
PACE_TICK = 0.002
# Bus.deliver calls awaiting their replies at once at a fixed rate. At the bound a
# tick sends nothing and its users go out with a later tick: a stalled Redis gets a
# bounded backlog, not one call per tick for as long as it stalls.
MAX_CALLS_IN_FLIGHT = 64

Deliver = Callable[[list[str], bytes], Awaitable[dict[str, int]]]


def fanout_body(payload: int, sent_us: int) -> bytes:
    """A notification frame without its leading "{" (the delivery script adds the seq)."""
    return b'"ts":%d,"type":"notification","level":"info","title":"loadtest","body":"%s"}' % (
        sent_us,
        b"x" * payload,
    )


async def publish(
    config: LoadConfig,
    fleet: Fleet,
    tally: Tally,
    deliver: Deliver,
    published: dict[str, SeqRanges],
) -> int:
    """Publish for `duration` seconds at `rate` (or as fast as the window allows); how many
    user deliveries were published."""
    users = fleet.users
    per_user_rate = config.rate * config.share / config.devices
    # Frames owed by each publish to a user: its devices that connected.
    owed = {u: 0 for u in users}
    for device in fleet.connected:
        owed[device.user] += 1
    count = cursor = in_flight = 0
    started = time.monotonic()
    deadline = started + config.duration

    def take(size: int) -> list[str]:
        nonlocal cursor, count
        # A user at most once per call: Bus.deliver publishes to each user once.
        size = min(size, len(users))
        batch = [users[(cursor + i) % len(users)] for i in range(size)]
        cursor = (cursor + size) % len(users)
        count += size
        return batch

    async def one_batch(batch: list[str]) -> None:
        nonlocal in_flight
        sent = monotonic_us()
        try:
            seqs = await deliver(batch, fanout_body(config.payload, sent))
        except Exception as exc:
            tally.error("publish")
            log.warning("publish failed: %s", exc)
            return
        tally.publish.record(monotonic_us() - sent)
        for user, seq in seqs.items():
            published[user].add(seq)
            in_flight += owed[user]

    async def paced() -> None:
        # Open loop, as independent publishers are: every tick sends what fell due
        # since the last one as one call, without waiting for earlier calls' replies.
        # Awaiting each reply first (as this did) stopped publishing while Redis
        # stalled, hiding the stall from the latency of the frames not yet sent, then
        # sent them as one burst of up to `batch` users. Batching per tick also keeps
        # the calls few: each costs ~100 µs of client CPU however small.
        calls: set[asyncio.Task[None]] = set()
        while (now := time.monotonic()) < deadline:
            due = int((now - started) * per_user_rate) - count
            if due > 0 and len(calls) < MAX_CALLS_IN_FLIGHT:
                call = asyncio.create_task(one_batch(take(min(due, config.batch))))
                calls.add(call)
                call.add_done_callback(calls.discard)
                if due > min(config.batch, len(users)):  # behind after a stall: go on
                    await asyncio.sleep(0)
                    continue
            next_tick = started + (int((now - started) / PACE_TICK) + 1) * PACE_TICK
            await asyncio.sleep(next_tick - time.monotonic())
        if calls:
            await asyncio.gather(*calls)

    async def flat_out() -> None:
        while time.monotonic() < deadline:
            if in_flight - tally.delivered > config.in_flight:
                await asyncio.sleep(0.0005)
                continue
            await one_batch(take(config.batch))

    if per_user_rate > 0:
        await paced()
    else:
        # Two pipelines in flight keep Redis busy while the other one's replies are read.
        await asyncio.gather(flat_out(), flat_out())
    return sum(len(seqs) for seqs in published.values())


async def settle(config: LoadConfig, tally: Tally, expected: int) -> None:
    """Wait for stragglers: until everything arrived, or `settle` seconds."""
    deadline = time.monotonic() + config.settle
    # Polled: an event set per received frame would cost more than the wait.
    while time.monotonic() < deadline:
        if tally.delivered >= expected:
            return
        await asyncio.sleep(0.05)


def account(report: Report, fleet: Fleet, published: dict[str, SeqRanges]) -> None:
    for device in fleet.connected:
        report.lost += device.received.missing_from(published[device.user], device.baseline)
        report.duplicated += device.duplicated
        report.out_of_order += device.out_of_order
        assert device.client is not None
        report.gaps += device.client.stats.gaps
