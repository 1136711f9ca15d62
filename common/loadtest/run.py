"""`fanout loadtest`: many devices on FanoutClient, driven in `idle`, `fanout` or `chat` mode.

`fanout` publishes logged `notification` frames with Bus.deliver, the workers' own
path, with the publish time (monotonic µs, one clock for every process on the host)
as the frame's first field after the seq: ``{"seq":N,"ts":T,...``. Receivers read
both numbers from that prefix without parsing the JSON (common/loadtest/fleet.py).
Bus.deliver returns each user's seq, so the run knows every seq it published and,
after the settle period, counts exactly which each device lacks (lost), got twice
(duplicated) or got after a newer one (out of order).

A delivery is one frame received by one device; `--rate` counts those, so a user
publish reaches `--devices` of them. `--rate 0` is as fast as possible: publishing
pauses while more than `--window` frames are in flight, so the nodes are measured at
the rate they sustain rather than at the size of their queues. The measured window
is the publishing (chat: sending; idle: holding) period; CPU is read from /proc at
its start and end, for this process and for every `--server-pid`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from common.config import ConfigError, Settings
from common.loadtest.chat import ChatDriver
from common.loadtest.fleet import (
    MODES,
    Fleet,
    LoadConfig,
    Tally,
    progress,
    raise_fd_limit,
    watch_loop,
)
from common.loadtest.multi import run_processes, shard_sync
from common.loadtest.publish import Deliver, account, publish, settle
from common.loadtest.report import (
    LatencyHistogram,
    Report,
    SeqRanges,
    cpu_seconds,
    machine_busy_seconds,
    postgres_cpu_seconds,
    rss_bytes,
)
from common.transport.bus import Bus, connect_redis
from common.transport.connection import RespConnection, address_of

log = logging.getLogger("fanout.loadtest")

Sync = Callable[[str], Awaitable[None]]


class Probe:
    """CPU (own, servers', Redis', Postgres', the machine's) and delivered counts at the
    start and end of the window, and this process's loop lag in between."""

    def __init__(self, pids: tuple[int, ...], tally: Tally, bus: Bus) -> None:
        self._pids, self._tally, self._bus = pids, tally, bus
        self.at: list[dict[str, Any]] = []
        self.lag = LatencyHistogram()
        self._watch: asyncio.Task[None] | None = None

    async def mark(self) -> None:
        """The window starts (first call) or ends (second)."""
        await self._stop_watching()
        if not self.at:
            self._watch = asyncio.create_task(watch_loop(self.lag), name="loop-lag")
        info: Any = {}
        with contextlib.suppress(Exception):
            info = await self._bus.redis.info("cpu")
        self.at.append(
            {
                "t": time.perf_counter(),
                "self": cpu_seconds(),
                "servers": [cpu_seconds(p) for p in self._pids],
                "redis": float(info.get("used_cpu_user", 0)) + float(info.get("used_cpu_sys", 0)),
                "postgres": postgres_cpu_seconds(),
                "delivered": self._tally.delivered,
                "machine": machine_busy_seconds(),
            }
        )

    async def _stop_watching(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None

    async def close(self) -> None:
        await self._stop_watching()

    def window(self) -> float:
        return self.at[-1]["t"] - self.at[0]["t"] if len(self.at) > 1 else 0.0

    def delta(self, key: str) -> float:
        first, last = self.at[0][key], self.at[-1][key]
        if isinstance(first, dict):
            # By pid: a process that started in the window counts whole, one that ended
            # in it is missed (Postgres backends live as long as their pool's connection).
            return float(sum(cpu - first.get(pid, 0.0) for pid, cpu in last.items()))
        if isinstance(first, list):
            return float(sum(b - a for a, b in zip(first, last, strict=True)))
        return float(last - first)


async def run(
    config: LoadConfig,
    settings: Settings,
    *,
    deliver: Deliver | None = None,
    sync: Sync | None = None,
) -> Report:
    """One load test in this process.

    `deliver` replaces Bus.deliver (tests: a deliberately lossy bus); `sync(stage)` is
    awaited once connected ("ready") and when the measured window ends ("done"), so
    several processes can run one test (common/loadtest/multi.py).
    """
    if config.mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}")
    chat: ChatDriver | None = None
    raise_fd_limit(len(config.user_indices) * config.devices)
    tally = Tally()
    fleet = Fleet(config, tally, config.run_id or uuid.uuid4().hex[:8])
    redis = await connect_redis(settings)
    # Publishing shares one pipelined connection, as on a worker (redis-py's packing
    # was ~40% of the generator's CPU and delayed the frames it had stamped).
    commands = None if settings.redis_cluster else RespConnection(address_of(redis))
    bus = Bus(redis, settings, commands)
    probe = Probe(config.server_pids, tally, bus)
    report = Report(config.mode, config.urls, config.public())
    rss_before = [rss_bytes(p) for p in config.server_pids]
    self_rss_before = rss_bytes()
    ticker = asyncio.create_task(progress(fleet, tally)) if config.progress else None
    try:
        if config.mode == "fanout":
            await fleet.open(lambda d: {"on_logged": d.on_logged})
        elif config.mode == "chat":
            chat = ChatDriver(config, fleet, tally)
            await fleet.open(chat.handlers)
            await chat.prepare()
        else:
            await fleet.open()
        # Thousands of long-lived client objects: keep the cyclic GC from rescanning them.
        gc.collect()
        gc.freeze()
        report.connections = fleet.connection_stats()
        if sync is not None:
            await sync("ready")
        await probe.mark()
        if not fleet.connected:
            # Nothing to measure: publishing to nobody would report "lost 0" for a run
            # that reached no one. The connect errors say why (and the exit status is 1).
            await probe.mark()
            if sync is not None:
                await sync("done")
        elif config.mode == "fanout":
            published = {u: SeqRanges() for u in fleet.users}
            report.published = await publish(
                config, fleet, tally, deliver or bus.deliver, published
            )
            await probe.mark()
            if sync is not None:
                await sync("done")
            report.expected = sum(len(published[d.user]) for d in fleet.connected)
            await settle(config, tally, report.expected)
            account(report, fleet, published)
        elif chat is not None:
            await chat.run(report)
            await probe.mark()
            if sync is not None:
                await sync("done")
            await chat.settle()
            chat.account(report)
        else:
            await asyncio.sleep(config.duration)
            await probe.mark()
            if sync is not None:
                await sync("done")
        report.connections = fleet.connection_stats()
        report.delivered = tally.delivered
        report.delivered_in_window = int(probe.delta("delivered"))
        report.window_s = probe.window()
        report.latency_ms = tally.latency.summary_ms()
        report.publish_ms = tally.publish.summary_ms() if tally.publish.count else None
        report.errors = {**tally.errors, **{f"close:{k}": v for k, v in _bad_closes(fleet)}}
        _costs(report, probe, config, rss_before, self_rss_before)
        if config.shard is not None:
            report.raw = {
                "latency": tally.latency.sparse(),
                "publish": tally.publish.sparse(),
                "connect_s": fleet.connect_times(),
                "own_cpu_seconds": probe.delta("self"),
                "delivered_in_window": report.delivered_in_window,
                "loop_lag": probe.lag.sparse(),
            }
    finally:
        await probe.close()
        if ticker is not None:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
        gc.unfreeze()
        if chat is not None and not config.keep_data:
            await chat.delete_sessions()
        await fleet.close()
        if not config.keep_data:
            await forget_users(bus, fleet.users)
        if commands is not None:
            await commands.close()
        await redis.aclose()
    return report


async def forget_users(bus: Bus, users: list[str]) -> None:
    """Delete the run's per-user keys: every run has fresh users, whose seq counters and
    logs would otherwise stay in Redis for days (SEQ_TTL, FANOUT_USER_LOG_TTL)."""
    k = bus.keys
    names = [n for u in users for n in (k.seq(u), k.log(u), k.devices(u), k.device_conns(u))]
    with contextlib.suppress(Exception):  # best effort: the data expires anyway
        for start in range(0, len(names), 1000):
            await bus.redis.unlink(*names[start : start + 1000])


def _bad_closes(fleet: Fleet) -> list[tuple[str, int]]:
    closes: dict[str, int] = fleet.connection_stats()["closes"]
    return [(code, n) for code, n in closes.items() if code != "1000"]


def _costs(
    report: Report, probe: Probe, config: LoadConfig, rss_before: list[int], self_rss: int
) -> None:
    report.set_costs(
        own_cpu=probe.delta("self"),
        rss=rss_bytes(),
        rss_grown=rss_bytes() - self_rss,
        redis_cpu=probe.delta("redis"),
        postgres_cpu=probe.delta("postgres"),
    )
    if config.server_pids:
        rss_after = [rss_bytes(p) for p in config.server_pids]
        report.set_servers(config.server_pids, probe.delta("servers"), rss_before, rss_after)
    report.set_contention(machine_cpu=probe.delta("machine"), lag=probe.lag)


def config_from_args(args: Any, settings: Settings) -> LoadConfig:
    """The run `fanout loadtest` was asked for; ConfigError on a bad combination."""
    secret = args.secret or settings.jwt_secret
    if not secret:
        raise ConfigError("fanout loadtest signs tokens with FANOUT_JWT_SECRET (or --secret)")
    if args.devices < 1 or args.connections < 1:
        raise ConfigError("--connections and --devices must be at least 1")
    connections = args.connections
    if args.users is not None:
        if args.users < 1:
            raise ConfigError("--users must be at least 1")
        connections = args.users * args.devices
    if connections < args.devices:
        raise ConfigError("--connections must be at least --devices")
    if args.connect_timeout <= 0:
        raise ConfigError("--connect-timeout must be positive")
    for name in ("rate", "duration", "ramp", "settle"):
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name} must not be negative")
    if not 1 <= args.processes <= 64:
        raise ConfigError("--processes must be between 1 and 64")
    if args.shard is not None and not 0 <= args.shard < args.processes:
        raise ConfigError("--shard must be below --processes")
    return LoadConfig(
        urls=args.url or ["ws://127.0.0.1:8080/ws"],
        secret=secret,
        mode=args.mode,
        connections=connections - connections % args.devices,
        devices=args.devices,
        rate=args.rate,
        duration=args.duration,
        ramp=args.ramp,
        payload=args.payload,
        settle=args.settle,
        window=args.window,
        batch=max(1, args.batch),
        connect_concurrency=max(1, args.connect_concurrency),
        connect_timeout=args.connect_timeout,
        server_pids=tuple(args.server_pid or ()),
        progress=not args.quiet,
        keep_data=args.keep_data,
        processes=args.processes,
        shard=args.shard,
        run_id=args.run_id or "",
    )


def main(args: Any, settings: Settings) -> None:
    """`fanout loadtest`: run, print the report (text or --json); exit 1 if anything was lost."""
    import orjson

    from common.runtime import run as run_loop

    config = config_from_args(args, settings)
    # Each refused client would log its own line; the report counts them by cause.
    logging.getLogger("fanout.client").setLevel(logging.CRITICAL)
    result: list[Report] = []

    async def go() -> None:
        if config.shard is not None:
            result.append(await run(config, settings, sync=shard_sync))
        elif config.processes > 1:
            result.append(await run_processes(config))
        else:
            result.append(await run(config, settings))

    run_loop(go())
    report = result[0]
    if args.json:
        sys.stdout.write(orjson.dumps(report.as_json(), option=orjson.OPT_INDENT_2).decode())
        sys.stdout.write("\n")
    else:
        print(report.text())
    broken = report.lost or report.duplicated or report.out_of_order
    if broken or report.connections.get("failed") or report.error_count:
        sys.exit(1)
