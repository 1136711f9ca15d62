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
dead-letter stream (worker/failures.py). The stream commands themselves are in
worker/partition_stream.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import redis.asyncio as aioredis

from common.config import Settings
from common.errors import SERVICE_DOWN
from common.transport.connection import RespConnection
from common.transport.entries import BadEntry, ChatEntry
from common.transport.keys import Keys
from worker.failures import EntryFailures
from worker.outage import OutageLog, retry_pacing
from worker.partition_stream import Entry, PartitionStream
from worker.processor import ChatProcessor

log = logging.getLogger("fanout.worker")

RETRY_PAUSE = 0.2
# Entries of one partition in hand at once (read, not yet acknowledged or failed).
MAX_INFLIGHT = 256
# How long a read waits for new entries; acknowledgements are flushed between reads.
READ_BLOCK_MS = 100
# Seconds a partition given up gracefully waits for its replies in generation; the
# rest are made again by the next owner (their owed notes stay).
REPLY_GRACE = 3.0


class PartitionConsumer:
    """Processes one owned partition: in order within a conversation, concurrently across."""

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
        self._stream = PartitionStream(
            partition,
            redis=redis,
            stream=keys.partition_stream(partition),
            consumer=consumer,
            claim_idle=settings.claim_idle,
            commands=commands,
        )
        self._failures = EntryFailures(
            self._stream,
            redis=redis,
            dead_letters=keys.dead_letters(partition),
            max_attempts=settings.max_attempts,
        )
        self._processor = processor
        self._limit = limit
        self._on_health = on_health
        self._stopping = False
        self._inflight: set[asyncio.Task[bool]] = set()
        self._tails: dict[str, asyncio.Task[bool]] = {}
        self._acks: list[bytes] = []
        self._stream_failed = False
        self._stream_outage = OutageLog(partition, "stream")
        self._entry_outage = OutageLog(partition, "entries")

    @property
    def failures(self) -> int:
        """Entries that failed (each delivery counts), dead-lettered ones included."""
        return self._failures.failures

    @property
    def dead_lettered(self) -> int:
        """Entries moved to the dead-letter stream."""
        return self._failures.dead_lettered

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
                        await self._stream.ensure_group()
                        await self._stream.adopt_orphans(stopping=lambda: self._stopping)
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
            await self._stream.hand_over(MAX_INFLIGHT)
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
            await self._stream.close()

    async def _read_new(self) -> bool:
        """Read and dispatch new entries; True if our pending entries must be re-read."""
        await self._make_room()
        for entry_id, fields in await self._stream.read(">", block=READ_BLOCK_MS):
            await self._dispatch(entry_id, fields)
        await self._flush_acks()
        return self._stream_failed

    async def _retry_pending(self) -> bool:
        """Re-process our pending entries in order; True if some are still failing."""
        await self._settle()
        self._stream_failed = False
        entries = await self._stream.read("0")
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
            await self._failures.dead_letter(entry_id, fields, str(exc))
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
                dead = await self._failures.failed(entry_id, entry, exc)
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
                await self._stream.ack_with_deliveries(done)
            except BaseException:
                # Sent again once Redis answers (an XACK that did arrive twice is harmless).
                self._acks = done + self._acks
                raise
            await self._stream.trim()

    async def _process(self, entries: list[Entry]) -> bool:
        """Process a batch; True if every entry was acknowledged."""
        conversations: dict[str, list[tuple[bytes, ChatEntry]]] = {}
        done: list[bytes] = []
        for entry_id, fields in entries:
            try:
                entry = ChatEntry.decode(fields.get(b"c", b""))
            except BadEntry as exc:
                await self._failures.dead_letter(entry_id, fields, str(exc))
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
            await self._stream.ack(done)
            await self._stream.trim()
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
                    if not await self._failures.failed(entry_id, entry, exc):
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
