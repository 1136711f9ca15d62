"""Loss/duplicate/order checking for fault tests: a steady flow of logged deliveries to
users, and devices (FanoutClient) whose received seqs are compared with the log."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from common.client.fanout import FanoutClient
from common.config import Settings
from common.protocol import encode
from common.transport.bus import Bus, connect_redis
from tests.support.harness import token


@dataclass
class Device:
    user: str
    client: FanoutClient
    start_seq: int = 0
    seqs: list[int] = field(default_factory=list)

    def on_frame(self, frame: dict[str, Any]) -> None:
        if "seq" in frame:
            self.seqs.append(frame["seq"])


@dataclass
class Report:
    lost: int
    duplicated: int
    out_of_order: int
    delivered: int
    published: int

    def assert_clean(self) -> None:
        assert (self.lost, self.duplicated, self.out_of_order) == (0, 0, 0), self


class Flow:
    """Publishes notification frames (logged, with seq) round-robin to users."""

    def __init__(self, settings: Settings, users: list[str]) -> None:
        self._settings = settings
        self.users = users
        self.published = 0

    async def run(self, *, rate: float, duration: float) -> None:
        redis = await connect_redis(self._settings)
        bus = Bus(redis, self._settings)
        try:
            interval = 1 / rate
            deadline = time.monotonic() + duration
            n = 0
            while time.monotonic() < deadline:
                user = self.users[n % len(self.users)]
                body = encode(
                    {"type": "notification", "level": "info", "title": f"#{n}", "body": "flow"}
                )[1:]
                await bus.deliver([user], body)
                self.published += 1
                n += 1
                await asyncio.sleep(interval)
        finally:
            await redis.aclose()


@contextlib.asynccontextmanager
async def devices(urls: list[str], users: list[str], per_user: int) -> AsyncIterator[list[Device]]:
    """Connected FanoutClients, `per_user` devices for each user."""
    made: list[Device] = []
    async with contextlib.AsyncExitStack() as stack:
        for user in users:
            for d in range(per_user):
                device = Device(user, None)  # type: ignore[arg-type]
                client = FanoutClient(
                    urls, lambda u=user: token(u), f"dev{d}", on_frame=device.on_frame
                )
                device.client = client
                await stack.enter_async_context(client)
                made.append(device)
        await asyncio.gather(*(d.client.wait_connected() for d in made))
        for device in made:
            device.start_seq = device.client.last_seq or 0
        yield made


async def check(devices: list[Device], settings: Settings, *, settle: float = 15) -> Report:
    """Wait until every device has its user's newest seq, then count what went wrong."""
    redis = await connect_redis(settings)
    bus = Bus(redis, settings)
    try:
        newest = {u: await bus.current_seq(u) for u in {d.user for d in devices}}
    finally:
        await redis.aclose()
    deadline = time.monotonic() + settle
    while time.monotonic() < deadline:
        if all((d.client.last_seq or 0) >= newest[d.user] for d in devices):
            break
        await asyncio.sleep(0.1)
    lost = duplicated = out_of_order = delivered = 0
    for device in devices:
        expected = list(range(device.start_seq + 1, newest[device.user] + 1))
        got = device.seqs
        delivered += len(got)
        lost += len(set(expected) - set(got))
        duplicated += len(got) - len(set(got))
        out_of_order += sum(1 for a, b in itertools.pairwise(got) if b <= a)
    return Report(lost, duplicated, out_of_order, delivered, sum(newest.values()))
