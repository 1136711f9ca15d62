"""The load generator's devices: FanoutClients opened with a ramp, and what they received.

Connection k is device k % devices of user k // devices and goes to node URL
k % len(urls), as a round-robin load balancer would place it. Users are fresh for
every run (a random prefix), so their seqs start at 1. A device takes logged frames
on FanoutClient's lean path (seq and publish time read from the fixed prefix
``{"seq":N,"ts":T,``, no JSON parse) and keeps the seqs it got as ranges.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp

from common.auth import mint_token
from common.client.fanout import FanoutClient
from common.loadtest.report import LatencyHistogram, SeqRanges, percentiles_ms

log = logging.getLogger("fanout.loadtest")

MODES = ("idle", "fanout", "chat")
# File descriptors kept free beyond one per connection (Redis, HTTP, stdio).
SPARE_FDS = 256
# Clients closed at once at the end: each close is a round trip with its node.
CLOSE_BATCH = 500
# Microseconds between samples of this process's own loop lag (`watch_loop`).
LAG_PERIOD_US = 5000


def monotonic_us() -> int:
    return time.monotonic_ns() // 1000


@dataclass(frozen=True)
class LoadConfig:
    """One run; `fanout loadtest --help` documents each field."""

    urls: list[str]
    secret: str
    mode: str = "fanout"
    connections: int = 1000
    devices: int = 2
    rate: float = 0.0
    duration: float = 10.0
    ramp: float = 0.0
    payload: int = 64
    settle: float = 3.0
    window: int = 0  # 0: 2 frames per connection, at least 1000
    batch: int = 100  # users per Bus.deliver pipeline at the maximum rate
    connect_concurrency: int = 200
    connect_timeout: float = 30.0
    server_pids: tuple[int, ...] = ()
    progress: bool = True
    token_ttl: float = 3600.0
    keep_data: bool = False  # leave the run's sessions and per-user Redis keys in place
    # Load generator processes, and which of them this one is (None: the parent, or
    # the only one). Process i holds users i, i + processes, ... (common/loadtest/multi.py).
    processes: int = 1
    shard: int | None = None
    run_id: str = ""

    @property
    def users(self) -> int:
        return self.connections // self.devices

    @property
    def user_indices(self) -> range:
        """The users (by index) this process drives."""
        if self.shard is None:
            return range(self.users)
        return range(self.shard, self.users, self.processes)

    @property
    def share(self) -> float:
        """This process's part of the rate, the window and the handshakes."""
        return 1.0 if self.shard is None else 1.0 / self.processes

    def public(self) -> dict[str, Any]:
        """The settings as shown in a report (no secret)."""
        shown = asdict(self)
        del shown["secret"]
        shown["users"] = self.users
        shown["window"] = self.window or max(1000, 2 * self.connections)
        return shown

    @property
    def in_flight(self) -> int:
        window = self.window or max(1000, 2 * self.connections)
        return max(1, int(window * self.share))


@dataclass
class Tally:
    """Counts shared by every device (one event loop: no locks)."""

    delivered: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    # How long each Bus.deliver call took (publisher + Redis, not the nodes).
    publish: LatencyHistogram = field(default_factory=LatencyHistogram)
    errors: dict[str, int] = field(default_factory=dict)

    def error(self, kind: str, n: int = 1) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + n


class Device:
    """One connection of the run, with the seqs it received."""

    __slots__ = (
        "baseline",
        "client",
        "connect_s",
        "duplicated",
        "out_of_order",
        "received",
        "tally",
        "user",
    )

    def __init__(self, user: str, tally: Tally) -> None:
        self.user = user
        self.tally = tally
        self.received = SeqRanges()
        self.baseline = 0  # welcome.last_seq: this device is owed every seq after it
        self.connect_s: float | None = None
        self.duplicated = 0
        self.out_of_order = 0
        self.client: FanoutClient | None = None

    def on_logged(self, seq: int, data: str) -> None:
        """Lean receive path: seq and publish time from the fixed prefix, no JSON parse."""
        self.received.add(seq)
        tally = self.tally
        tally.delivered += 1
        comma = data.index(",", 7)
        if data.startswith('"ts":', comma + 1):
            sent = int(data[comma + 6 : data.index(",", comma + 6)])
            tally.latency.record(monotonic_us() - sent)

    def on_stale(self, seq: int) -> None:
        """A logged frame the client dropped: seen before, or late after a newer one."""
        if seq in self.received:
            self.duplicated += 1
        else:
            self.out_of_order += 1
            self.received.add(seq)

    def on_frame(self, frame: dict[str, Any]) -> None:
        if frame.get("type") == "error":
            self.tally.error(f"error_frame:{frame.get('code')}")


class Fleet:
    """The run's connections: opened with a ramp and a concurrency bound, closed at the end."""

    def __init__(self, config: LoadConfig, tally: Tally, run_id: str) -> None:
        self.config = config
        self.tally = tally
        self.indices = config.user_indices
        self.users = [f"lt{run_id}-u{i}" for i in self.indices]
        self.tokens = {u: mint_token(config.secret, u, ttl=config.token_ttl) for u in self.users}
        self.devices: list[Device] = []
        self.failed = 0
        self.http: aiohttp.ClientSession | None = None

    async def open(self, handlers: Callable[[Device], dict[str, Any]] = lambda d: {}) -> None:
        """Connect every device; `handlers(device)` gives FanoutClient's callbacks."""
        cfg = self.config
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        gate = asyncio.Semaphore(max(1, int(cfg.connect_concurrency * cfg.share)))
        step = cfg.ramp / max(1, cfg.users * cfg.devices)
        started = time.monotonic()

        async def one(local: int) -> None:
            user = self.users[local // cfg.devices]
            # k: the connection's number across all processes, so placement and ramp
            # are the same however many processes share the run.
            k = self.indices[local // cfg.devices] * cfg.devices + local % cfg.devices
            device = Device(user, self.tally)
            self.devices.append(device)
            await asyncio.sleep(max(0.0, started + k * step - time.monotonic()))
            async with gate:
                begun = time.perf_counter()
                client = FanoutClient(
                    cfg.urls,
                    self.tokens[user],
                    f"d{k % cfg.devices}",
                    first_url=k % len(cfg.urls),
                    **{
                        "on_frame": device.on_frame,
                        "on_stale": device.on_stale,
                        **handlers(device),
                    },
                )
                device.client = await client.__aenter__()
                try:
                    await client.wait_connected(cfg.connect_timeout)
                except (TimeoutError, ConnectionError) as exc:
                    self.failed += 1
                    # An error with its cause (SPEC §8): "refused 401", "ConnectionRefusedError…"
                    cause = client.fatal or client.stats.last_failure or str(exc)
                    self.tally.error(f"connect failed: {cause}")
                    log.debug("%s/%s: %s", user, client.device_id, exc)
                    return
                device.connect_s = time.perf_counter() - begun
                device.baseline = client.last_seq or 0

        await asyncio.gather(*(one(j) for j in range(len(self.users) * cfg.devices)))

    @property
    def connected(self) -> list[Device]:
        return [d for d in self.devices if d.connect_s is not None]

    def connection_stats(self) -> dict[str, Any]:
        clients = [d.client for d in self.devices if d.client is not None]
        closes: dict[str, int] = {}
        for c in clients:
            for code in c.stats.closes:
                closes[str(code)] = closes.get(str(code), 0) + 1
        return {
            "target": len(self.users) * self.config.devices,
            "made": len(self.connected),
            "failed": self.failed,
            "reconnects": sum(max(0, c.stats.connects - 1) for c in clients),
            "failed_attempts": sum(c.stats.failed_attempts for c in clients),
            "closes": closes,
            "connect_ms": percentiles_ms(self.connect_times()),
        }

    def connect_times(self) -> list[float]:
        return [d.connect_s for d in self.devices if d.connect_s is not None]

    async def close(self) -> None:
        clients = [d.client for d in self.devices if d.client is not None]
        for start in range(0, len(clients), CLOSE_BATCH):
            await asyncio.gather(
                *(c.__aexit__(None, None, None) for c in clients[start : start + CLOSE_BATCH]),
                return_exceptions=True,
            )
        if self.http is not None:
            await self.http.close()


async def progress(fleet: Fleet, tally: Tally, extra: Callable[[], str] = lambda: "") -> None:
    """One status line a second on stderr: connections, rate, p99 so far, errors."""
    started, last = time.monotonic(), tally.delivered
    before = tally.latency.snapshot()
    while True:
        await asyncio.sleep(1.0)
        latency = tally.latency  # replaced after a warm-up
        now = tally.delivered
        errors = sum(tally.errors.values())
        # The chat driver restarts the count after its warm-up: a rate is never negative.
        rate = now - last if now >= last else now
        print(
            f"[{time.monotonic() - started:6.1f}s] conns {len(fleet.connected)}"
            f"/{len(fleet.users) * fleet.config.devices} (failed {fleet.failed})  "
            f"rate {rate:,}/s  p99 {latency.percentile(0.99) / 1000:.2f} ms "
            f"(last 1 s: {latency.percentile(0.99, before) / 1000:.2f} ms)  "
            f"errors {errors}{extra()}",
            file=sys.stderr,
            flush=True,
        )
        last, before = now, latency.snapshot()


async def watch_loop(lag: LatencyHistogram) -> None:
    """Record how late a short sleep wakes, until cancelled. Every latency this process
    takes while its loop is late (busy, or waiting for a CPU) is late by as much."""
    while True:
        asleep = time.monotonic_ns()
        await asyncio.sleep(LAG_PERIOD_US / 1e6)
        lag.record(max(0, (time.monotonic_ns() - asleep) // 1000 - LAG_PERIOD_US))


def raise_fd_limit(connections: int) -> None:
    """One descriptor per connection: raise the soft limit up to the hard one, or say how."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + SPARE_FDS
    if soft >= wanted:
        return
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < wanted:
        print(
            f"fanout loadtest: the open-file limit is {hard}, {connections} connections need "
            f"{wanted}; raise it (ulimit -Hn {wanted}, or LimitNOFILE=) or some will fail",
            file=sys.stderr,
        )
