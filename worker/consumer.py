"""One owned partition stream, read through the consumer group and processed in order.

Entries stream through: each is chained behind the previous entry of its conversation
(so a conversation runs in order) while other conversations run concurrently, and the
reader keeps reading as long as fewer than MAX_INFLIGHT entries are in hand — a slow
conversation does not hold up the others. An entry is acknowledged only after its
Postgres commit. When a backing service is down the entry is retried in place (not
counted as a failure), and so are the consumer's own stream commands: it keeps its
partition and what it has in hand through a Redis outage (worker/outage.py); any
other failure leaves it and the rest of its conversation
pending: the reader then lets everything in hand finish and re-reads its pending
entries in order, and after `max_attempts` deliveries an entry goes to the
dead-letter stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from common.config import Settings
from common.errors import SERVICE_DOWN
from common.transport.connection import RespConnection, address_of
from common.transport.entries import BadEntry, ChatEntry
from common.transport.keys import CONSUMER_GROUP, Keys
from worker.outage import OutageLog, retry_pacing
from worker.processor import ChatProcessor

log = logging.getLogger("fanout.worker")

BATCH = 100
RETRY_PAUSE = 0.2
TRIM_INTERVAL = 1.0
# Entries of one partition in hand at once (read, not yet acknowledged or failed).
MAX_INFLIGHT = 256
# How long a read waits for new entries; acknowledgements are flushed between reads.
READ_BLOCK_MS = 100
# Seconds a partition given up gracefully waits for its replies in generation; the
# rest are made again by the next owner (their owed notes stay).
REPLY_GRACE = 3.0

Entry = tuple[bytes, dict[bytes, bytes]]


class PartitionConsumer:
    def __init__(
        self,
        partition: int,
        *,
        redis: aioredis.Redis,
        keys: Keys,
        settings: Settings,
        consumer: str,
        processor: ChatProcessor,
        limit: asyncio.Semaphore,
        on_health: Callable[[bool], None],
        commands: RespConnection | None = None,
    ) -> None:
        self.partition = partition
        self._redis = redis
        self._stream = keys.partition_stream(partition)
        self._dead = keys.dead_letters(partition)
        self._settings = settings
        self._consumer = consumer
        self._processor = processor
        self._limit = limit
        self._on_health = on_health
        self._commands = commands
        # Stream reads block, so they cannot share `commands`; they get a lean
        # connection of their own where there is a shared one (not in cluster mode).
        self._reader = RespConnection(address_of(redis)) if commands is not None else None
        self._stopping = False
        self.failures = 0
        self.dead_lettered = 0
        self._trimmed_at = 0.0
        self._inflight: set[asyncio.Task[bool]] = set()
        self._tails: dict[str, asyncio.Task[bool]] = {}
        self._acks: list[bytes] = []
        self._stream_failed = False
        self._stream_outage = OutageLog(partition, "stream")
        self._entry_outage = OutageLog(partition, "entries")

    def stop(self) -> None:
        """Finish the batch in hand, then return (graceful release)."""
        self._stopping = True

    async def run(self) -> None:
        """Consume until stopped; a Redis or Postgres outage is waited out in place."""
        started = False
        retry_pending = True  # our own PEL may hold entries from before a restart
        backoff = retry_pacing()
        try:
            while not self._stopping:
                try:
                    if not started:
                        await self._ensure_group()
                        await self._adopt_orphans()
                        # The replies the previous owner left owed (it died or let go).
                        await self._processor.replies.resume(self.partition)
                        started = True
                    elif retry_pending:
                        retry_pending = await self._retry_pending()
                    else:
                        retry_pending = await self._read_new()
                except SERVICE_DOWN as exc:
                    # A read whose reply was lost left entries in our PEL that were never
                    # dispatched: once Redis answers, re-read the PEL first.
                    retry_pending = True
                    self._on_health(False)
                    delay = backoff.next_delay()
                    self._stream_outage.failed(exc, delay)
                    await asyncio.sleep(delay)
                else:
                    if self._stream_outage.ongoing:
                        self._stream_outage.recovered()
                        self._on_health(True)
                        backoff.reset()
            await self._settle()
            await self._hand_over()
        except SERVICE_DOWN as exc:
            # Stopping during an outage: what is unacknowledged stays pending for the next
            # owner (processing is idempotent), which is no crash.
            log.warning("partition %d: stopped with acks unsent (%r)", self.partition, exc)
        finally:
            for task in self._inflight:  # cancelled (lease lost): the entries stay pending
                task.cancel()
            await asyncio.gather(*self._inflight, return_exceptions=True)
            # Given up gracefully, replies get a short while to finish; cancelled (the
            # lease is lost), none: another worker may own the partition already.
            grace = REPLY_GRACE if self._stopping else 0.0
            await self._processor.replies.release(self.partition, grace)
            if self._reader is not None:
                await self._reader.close()

    async def _hand_over(self) -> None:
        """Stopped with entries still pending (failing ones): mark them idle so the next
        owner claims them at once, not after FANOUT_CLAIM_IDLE (nothing here runs them
        any more once this returns)."""
        mine: Any = await self._redis.xpending_range(
            self._stream,
            CONSUMER_GROUP,
            min="-",
            max="+",
            count=MAX_INFLIGHT,
            consumername=self._consumer,
        )
        if mine:
            await self._redis.xclaim(
                self._stream,
                CONSUMER_GROUP,
                self._consumer,
                0,
                [p["message_id"] for p in mine],
                idle=int(self._settings.claim_idle * 1000),
                justid=True,
            )

    async def _read_new(self) -> bool:
        """Read and dispatch new entries; True if our pending entries must be re-read."""
        await self._make_room()
        for entry_id, fields in await self._read(">", block=READ_BLOCK_MS):
            await self._dispatch(entry_id, fields)
        await self._flush_acks()
        return self._stream_failed

    async def _retry_pending(self) -> bool:
        """Re-process our pending entries in order; True if some are still failing."""
        await self._settle()
        self._stream_failed = False
        entries = await self._read("0")
        if not entries:
            return False
        if await self._process(entries):
            return True  # more may wait beyond this batch: read again
        await asyncio.sleep(RETRY_PAUSE)  # a failing entry is not hammered
        return True

    async def _make_room(self) -> None:
        while len(self._inflight) >= MAX_INFLIGHT:
            await asyncio.wait(self._inflight, return_when=asyncio.FIRST_COMPLETED)
            await self._flush_acks()

    async def _settle(self) -> None:
        """Let every entry in hand finish, then acknowledge them."""
        if self._inflight:
            await asyncio.wait(set(self._inflight))
        await self._flush_acks()

    async def _dispatch(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        try:
            entry = ChatEntry.decode(fields.get(b"c", b""))
        except BadEntry as exc:
            await self._dead_letter(entry_id, fields, str(exc))
            return
        previous = self._tails.get(entry.session_id)
        task = asyncio.create_task(self._after(previous, entry_id, entry))
        self._tails[entry.session_id] = task
        self._inflight.add(task)
        task.add_done_callback(lambda done: self._forget(entry.session_id, done))

    def _forget(self, session_id: str, task: asyncio.Task[bool]) -> None:
        self._inflight.discard(task)
        if self._tails.get(session_id) is task:
            del self._tails[session_id]

    async def _after(
        self, previous: asyncio.Task[bool] | None, entry_id: bytes, entry: ChatEntry
    ) -> bool:
        """Process an entry once its conversation's previous entry succeeded."""
        try:
            if previous is not None and not await previous:
                return False  # held back: pending, re-read in order after the failure
            async with self._limit:
                await self._with_retry(entry)
        except asyncio.CancelledError:
            raise
        except SERVICE_DOWN:
            return False  # stopping during an outage: pending for the next owner, no failure
        except Exception as exc:
            try:
                dead = await self._failed(entry_id, entry, exc)
            except Exception:
                log.exception("partition %d: recording a failure failed", self.partition)
                dead = False
            if not dead:
                self._stream_failed = True
                return False
        else:
            self._acks.append(entry_id)
        return True

    async def _flush_acks(self) -> None:
        if self._acks:
            done, self._acks = self._acks, []
            try:
                if self._commands is not None:
                    # In the write the worker's deliveries go out in: no round trip of its own.
                    await self._commands.call("XACK", self._stream, CONSUMER_GROUP, *done)
                else:
                    await self._redis.xack(self._stream, CONSUMER_GROUP, *done)
            except BaseException:
                # Sent again once Redis answers (an XACK that did arrive twice is harmless).
                self._acks = done + self._acks
                raise
            await self._trim()

    async def _ensure_group(self) -> None:
        try:
            # From id 0: input enqueued before any worker ever ran is processed too.
            await self._redis.xgroup_create(self._stream, CONSUMER_GROUP, id="0", mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _adopt_orphans(self) -> None:
        """Claim entries left pending by earlier owners before reading anything new.

        Order matters: a conversation's old entries must run before its new ones, so
        this waits until every other consumer's pending entries are idle long enough
        to be claimed (FANOUT_CLAIM_IDLE), then takes them all.
        """
        idle_ms = int(self._settings.claim_idle * 1000)
        claimed = 0
        while not self._stopping:
            start: Any = "0-0"
            while True:
                # Not JUSTID: redis-py drops the cursor from that form's reply.
                reply: Any = await self._redis.xautoclaim(
                    self._stream, CONSUMER_GROUP, self._consumer, idle_ms, start, count=BATCH
                )
                start, claimed = reply[0], claimed + len(reply[1])
                if start in (b"0-0", "0-0"):
                    break
            others = [
                c
                for c in await self._redis.xinfo_consumers(self._stream, CONSUMER_GROUP)
                if c["name"].decode() != self._consumer
            ]
            if not any(c["pending"] for c in others):
                for c in others:  # stale consumers of dead or departed workers
                    await self._redis.xgroup_delconsumer(self._stream, CONSUMER_GROUP, c["name"])
                if claimed:
                    log.info("partition %d: reclaimed %d pending entries", self.partition, claimed)
                return
            await asyncio.sleep(min(1.0, self._settings.claim_idle / 4))

    async def _read(self, start: str, block: int | None = None) -> list[Entry]:
        if self._reader is not None:
            entries = await self._read_lean(start, block)
        else:
            reply: Any = await self._redis.xreadgroup(
                CONSUMER_GROUP,
                self._consumer,
                {self._stream: start},
                count=BATCH,
                block=block,
            )
            entries = reply[0][1] if reply else []
        # An entry deleted (trimmed) while pending comes back with no fields: just ack it.
        gone = [eid for eid, fields in entries if not fields]
        if gone:
            await self._redis.xack(self._stream, CONSUMER_GROUP, *gone)
        return [(eid, fields) for eid, fields in entries if fields]

    async def _read_lean(self, start: str, block: int | None) -> list[Entry]:
        """XREADGROUP on this consumer's own lean connection (a blocking read holds it)."""
        assert self._reader is not None
        args: list[str | int] = ["GROUP", CONSUMER_GROUP, self._consumer, "COUNT", BATCH]
        if block is not None:
            args += ["BLOCK", block]
        reply: Any = await self._reader.call("XREADGROUP", *args, "STREAMS", self._stream, start)
        if not reply:
            return []
        # [[stream, [[id, [field, value, ...] or nil], ...]]]
        return [
            (entry_id, dict(zip(flat[::2], flat[1::2], strict=True)) if flat else {})
            for entry_id, flat in reply[0][1]
        ]

    async def _process(self, entries: list[Entry]) -> bool:
        """Process a batch; True if every entry was acknowledged."""
        conversations: dict[str, list[tuple[bytes, ChatEntry]]] = {}
        done: list[bytes] = []
        for entry_id, fields in entries:
            try:
                entry = ChatEntry.decode(fields.get(b"c", b""))
            except BadEntry as exc:
                await self._dead_letter(entry_id, fields, str(exc))
                done.append(entry_id)
                continue
            conversations.setdefault(entry.session_id, []).append((entry_id, entry))
        results = await asyncio.gather(
            *(self._conversation(items) for items in conversations.values())
        )
        all_done = True
        for acked, complete in results:
            done.extend(acked)
            all_done = all_done and complete
        if done:
            await self._redis.xack(self._stream, CONSUMER_GROUP, *done)
            await self._trim()
        return all_done

    async def _conversation(self, items: list[tuple[bytes, ChatEntry]]) -> tuple[list[bytes], bool]:
        acked: list[bytes] = []
        async with self._limit:
            for entry_id, entry in items:
                try:
                    await self._with_retry(entry)
                except asyncio.CancelledError:
                    raise
                except SERVICE_DOWN:
                    return acked, False  # stopping during an outage: no failure
                except Exception as exc:
                    if not await self._failed(entry_id, entry, exc):
                        return acked, False  # the rest of this conversation waits
                acked.append(entry_id)
        return acked, True

    async def _with_retry(self, entry: ChatEntry) -> None:
        backoff = retry_pacing()
        while True:
            try:
                await self._processor.handle(entry)
                self._on_health(True)
                if self._entry_outage.ongoing:
                    self._entry_outage.recovered()
                return
            except SERVICE_DOWN as exc:
                if self._stopping:
                    raise
                self._on_health(False)
                delay = backoff.next_delay()
                self._entry_outage.failed(exc, delay)
                await asyncio.sleep(delay)

    async def _failed(self, entry_id: bytes, entry: ChatEntry, exc: Exception) -> bool:
        """Record a failure; True if the entry was dead-lettered (its conversation goes on)."""
        self.failures += 1
        info = await self._redis.xpending_range(
            self._stream, CONSUMER_GROUP, min=entry_id, max=entry_id, count=1
        )
        attempts = int(info[0]["times_delivered"]) if info else 1
        log.error(
            "partition %d: entry %s failed (attempt %d/%d): %r",
            self.partition,
            entry_id.decode(),
            attempts,
            self._settings.max_attempts,
            exc,
        )
        if attempts < self._settings.max_attempts:
            return False
        await self._dead_letter(entry_id, {b"c": entry.encode()}, repr(exc))
        return True

    async def _dead_letter(self, entry_id: bytes, fields: dict[bytes, bytes], reason: str) -> None:
        self.dead_lettered += 1
        record: dict[Any, Any] = {
            **fields,
            b"entry_id": entry_id,
            b"reason": reason[:1000].encode(),
            b"at": str(int(time.time() * 1000)).encode(),
        }
        await self._redis.xadd(self._dead, record, maxlen=10_000, approximate=True)
        await self._redis.xack(self._stream, CONSUMER_GROUP, entry_id)

    async def _trim(self) -> None:
        """Drop acknowledged entries: the stream holds only what is not yet processed."""
        now = time.monotonic()
        if now - self._trimmed_at < TRIM_INTERVAL:
            return
        self._trimmed_at = now
        groups = await self._redis.xinfo_groups(self._stream)
        group = next((g for g in groups if g["name"] == CONSUMER_GROUP.encode()), None)
        if group is None:
            return
        floor: bytes = group["last-delivered-id"]
        pending = await self._redis.xpending(self._stream, CONSUMER_GROUP)
        if pending["pending"]:
            floor = min(floor, pending["min"], key=_stream_id)
            await self._redis.xtrim(self._stream, minid=floor, approximate=False)
        else:
            # Everything up to last-delivered is acknowledged: keep only newer entries.
            ms, seq = _stream_id(floor)
            await self._redis.xtrim(self._stream, minid=f"{ms}-{seq + 1}", approximate=False)


def _stream_id(raw: bytes) -> tuple[int, int]:
    ms, _, seq = raw.decode().partition("-")
    return int(ms), int(seq or 0)
