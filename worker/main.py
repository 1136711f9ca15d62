"""`fanout worker`: lease partitions, run a consumer per owned partition, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import redis.asyncio as aioredis
from aiohttp import web

from common.config import ConfigError, Settings
from common.errors import StartError
from common.gcpause import freeze_startup_objects
from common.logs import setup_logging
from common.probes import all_ok, check_services, where
from common.runtime import run, stop_event
from common.store.postgres import Store
from common.store.schema import missing_migrations
from common.store.sessions import SessionChanges, SessionDirectory
from common.transport.bus import Bus, connect_redis
from common.transport.connection import RespConnection, command_connection
from common.transport.keys import Keys
from worker.assistant.base import ReplyGenerator
from worker.assistant.context import RecentTurns
from worker.assistant.echo import EchoAssistant
from worker.assistant.loader import open_generator
from worker.assistant.owed import OwedReplies
from worker.assistant.runner import ReplyRunner
from worker.consumer import PartitionConsumer
from worker.health import health_app
from worker.leases import PartitionLeases
from worker.outage import retry_pacing
from worker.processor import ChatProcessor
from worker.stats import WorkerStats
from worker.sweeper import ExpirySweeper
from worker.webhooks.dispatcher import dispatching
from worker.webhooks.metrics import WebhookCollector
from worker.writer import BatchWriter

log = logging.getLogger("fanout.worker")


class Worker:
    """Owns the partition consumers of one worker process."""

    def __init__(
        self,
        settings: Settings,
        redis: aioredis.Redis,
        store: Store,
        assistant: ReplyGenerator | None = None,
        commands: RespConnection | None = None,
        context: RecentTurns | None = None,
    ) -> None:
        self.settings = settings
        keys = Keys(settings.namespace)
        self._keys = keys
        self._redis = redis
        self.store = store
        self._commands = commands
        bus = Bus(redis, settings, commands)
        directory = SessionDirectory(redis, store, keys, commands)
        writer = BatchWriter(store)
        self.replies = ReplyRunner(
            assistant or EchoAssistant(delay=settings.echo_delay),
            store=store,
            bus=bus,
            writer=writer,
            owed=OwedReplies(redis, keys, commands),
            settings=settings,
            context=context,
        )
        self.processor = ChatProcessor(store, bus, directory, self.replies, writer)
        self.sweeper = ExpirySweeper(
            redis,
            keys,
            SessionChanges(store, bus, directory),
            worker_id=settings.node_id,
            interval=settings.sweep_interval,
            lease_ttl=settings.lease_ttl,
        )
        self.leases = PartitionLeases(
            redis,
            keys,
            worker_id=settings.node_id,
            partitions=settings.partitions,
            ttl=settings.lease_ttl,
        )
        self._limit = asyncio.Semaphore(settings.worker_concurrency)
        self.consumers: dict[int, tuple[PartitionConsumer, asyncio.Task[None]]] = {}
        self.healthy = True
        self.draining = False
        # Set when a consumer returns, so its partition is released without waiting a cycle.
        self._wake = asyncio.Event()
        self.started_at = time.time()

    @property
    def redis(self) -> aioredis.Redis:
        """The worker's redis-py client (health checks, leases, stats)."""
        return self._redis

    def _set_health(self, ok: bool) -> None:
        self.healthy = ok

    async def run(self, stop: asyncio.Event) -> None:
        interval = self.settings.lease_ttl / 3
        async with self.replies:  # replies still in hand after the drain are cancelled
            await self._run(stop, interval)

    async def _run(self, stop: asyncio.Event, interval: float) -> None:
        sweeper = asyncio.create_task(self.sweeper.run(), name="sweeper")
        watcher = asyncio.create_task(self._watch(interval), name="worker-events")
        try:
            while not stop.is_set():
                self._wake.clear()
                await self._rebalance()
                stopping = asyncio.ensure_future(stop.wait())
                woken = asyncio.ensure_future(self._wake.wait())
                await asyncio.wait(
                    [stopping, woken], timeout=interval, return_when=asyncio.FIRST_COMPLETED
                )
                stopping.cancel()
                woken.cancel()
        finally:
            self.draining = True
            for task in (watcher, sweeper):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            with contextlib.suppress(Exception):
                await self.sweeper.release()  # another worker sweeps without waiting
            await self._drain()

    async def _watch(self, interval: float) -> None:
        """Rebalance at once when another worker joins, leaves or releases a partition."""
        after: bytes | None = None
        backoff, failing = retry_pacing(), False
        while True:
            try:
                if after is None:
                    after = await self.leases.last_change()
                changed, after = await self.leases.next_change(after, block=interval)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Redis is down: the interval rebalance goes on; so does this, later.
                if not failing:
                    log.warning("waiting for worker events failed (retrying): %r", exc)
                failing = True
                await asyncio.sleep(backoff.next_delay())
                continue
            backoff.reset()
            failing = False
            if changed:
                self._wake.set()

    async def _rebalance(self) -> None:
        try:
            workers = await self.leases.live_workers()
            for partition in await self.leases.renew():
                log.warning("lost the lease of partition %d", partition)
                await self._cancel(partition)
            await self._reap()
            fair = self.leases.fair_share(workers)
            for partition in sorted(self.leases.owned, reverse=True)[
                : max(0, len(self.leases.owned) - fair)
            ]:
                consumer, _ = self.consumers[partition]
                consumer.stop()  # released once its batch is done (see _reap)
            for partition in await self.leases.acquire(fair):
                self._start(partition)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("partition rebalance failed: %s", exc)
            if time.monotonic() > self.leases.valid_until:
                # Leases may have expired and been taken: stop before doubling up.
                for partition in list(self.consumers):
                    await self._cancel(partition)
                self.leases.owned.clear()

    def _start(self, partition: int) -> None:
        consumer = PartitionConsumer(
            partition,
            redis=self._redis,
            keys=self._keys,
            settings=self.settings,
            consumer=self.settings.node_id,
            processor=self.processor,
            limit=self._limit,
            on_health=self._set_health,
            commands=self._commands,
        )
        task = asyncio.create_task(consumer.run(), name=f"partition-{partition}")
        task.add_done_callback(lambda _: self._wake.set())
        self.consumers[partition] = (consumer, task)
        log.info("consuming partition %d", partition)

    async def _reap(self) -> None:
        """Release the partitions of consumers that returned (stopped) or crashed."""
        for partition, (_, task) in list(self.consumers.items()):
            if task.done():
                del self.consumers[partition]
                if not task.cancelled() and task.exception() is not None:
                    log.error("partition %d consumer crashed: %r", partition, task.exception())
                await self.leases.release(partition)
                log.info("released partition %d", partition)

    async def _cancel(self, partition: int) -> None:
        entry = self.consumers.pop(partition, None)
        if entry is None:
            return
        entry[1].cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await entry[1]

    async def _drain(self) -> None:
        """Finish in-flight batches within the drain timeout, giving up each partition's
        lease as soon as its consumer is done; then the rest."""
        with contextlib.suppress(Exception):
            await self.leases.withdraw()
        for consumer, _ in self.consumers.values():
            consumer.stop()
        partition_of = {task: partition for partition, (_, task) in self.consumers.items()}
        pending = set(partition_of)
        deadline = time.monotonic() + self.settings.drain_timeout
        while pending and (left := deadline - time.monotonic()) > 0:
            done, pending = await asyncio.wait(
                pending, timeout=left, return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                with contextlib.suppress(Exception):
                    await self.leases.release(partition_of[task])
        for task in pending:
            task.cancel()
        await asyncio.gather(*partition_of, return_exceptions=True)
        self.consumers.clear()
        await self.processor.writer.close()
        with contextlib.suppress(Exception):
            await self.leases.leave()


async def serve(settings: Settings) -> None:
    # Down at start is one line and exit 1 (its supervisor restarts it), not a traceback.
    checks = await check_services(settings)
    if not all_ok(checks):
        down = "; ".join(
            f"{name} at {where(url)} {checks[name]}"
            for name, url in (("redis", settings.redis_url), ("postgres", settings.database_url))
            if checks[name] != "ok"
        )
        raise StartError(f"worker {settings.node_id} cannot start: {down}")
    redis = await connect_redis(settings)
    try:
        async with (
            Store.open(
                settings.database_url,
                max_size=settings.db_pool_size,
                webhooks=settings.webhook_url is not None,
            ) as store,
            command_connection(redis, cluster=settings.redis_cluster) as commands,
            open_generator(settings, store) as (assistant, context),
        ):
            async with store.acquire() as conn:
                missing = await missing_migrations(conn)
            if missing:
                raise ConfigError(
                    f"the database lacks migration {', '.join(map(str, missing))}:"
                    " run `fanout migrate` first"
                )
            worker = Worker(settings, redis, store, assistant, commands=commands, context=context)
            stats = WorkerStats(worker, redis)
            stop = stop_event()
            runner: web.AppRunner | None = None
            # Webhooks (FANOUT_WEBHOOK_URL): delivered beside the partitions, not in them.
            async with dispatching(settings, store, redis) as webhooks:
                if settings.worker_port is not None:
                    extra = [WebhookCollector(webhooks)] if webhooks is not None else []
                    # The head deadline of the node (node/http/deadlines.py); no route
                    # takes a body.
                    runner = web.AppRunner(
                        health_app(worker, stats, extra),
                        access_log=None,
                        keepalive_timeout=settings.http_head_timeout,
                    )
                    await runner.setup()
                    try:
                        await web.TCPSite(runner, "0.0.0.0", settings.worker_port).start()
                    except OSError as exc:
                        await runner.cleanup()
                        raise StartError(
                            f"cannot serve health on port {settings.worker_port}: "
                            f"{exc.strerror or exc}"
                        ) from None
                freeze_startup_objects()
                log.info("worker %s started (%d partitions)", settings.node_id, settings.partitions)
                try:
                    async with stats:  # written through the drain, removed once it is done
                        await worker.run(stop)
                finally:
                    if runner is not None:
                        await runner.cleanup()
    finally:
        await redis.aclose()
    log.info("worker %s stopped", settings.node_id)


def main(settings: Settings) -> None:
    setup_logging(settings.log_format)
    run(serve(settings))
