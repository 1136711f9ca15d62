"""Replies made beside the partition stream, not in its way (SPEC §10).

The processor stores and delivers a user's message, notes the reply as owed
(worker/assistant/owed.py) and hands it here; the chat entry is then acknowledged
and its partition goes on. Each reply is a task of its own:

- in order per session: a reply waits for the previous reply of its session;
- at most FANOUT_ASSISTANT_CONCURRENCY generate at once per worker; at most
  QUEUED_PER_SLOT times that many are in hand, beyond which `owe` waits (and with it
  the conversation whose message it is, and at the bound its partition's reader);
- a watcher polls the sessions being answered and stops a reply whose session was
  paused, handed to a human, closed or deleted: what was generated is stored with
  metadata.interrupted = true;
- a failed attempt (timeout, refused, HTTP error, malformed stream) is retried with
  back-off FANOUT_ASSISTANT_RETRIES times, then a `system` message with
  metadata.error is stored instead;
- the owed note is settled once the reply is stored and delivered. A partition
  given up cancels its replies (after a grace when given up gracefully): the note
  stays, and the next owner makes them (`resume`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

import asyncpg

from common.backoff import Backoff
from common.config import Settings
from common.errors import SERVICE_DOWN
from common.protocol import encode
from common.store import replies
from common.store.batch import ReplyWrite
from common.store.lifecycle import takes_assistant_reply
from common.store.postgres import MessageRecord, SessionRecord, Store
from common.transport.bus import Bus
from common.transport.keys import partition_of
from worker.assistant.base import ReplyGenerator
from worker.assistant.context import RecentTurns
from worker.assistant.owed import OwedReplies, OwedReply
from worker.assistant.stream import Attempt, Stop, stream_reply
from worker.outage import retry_pacing
from worker.writer import BatchWriter

log = logging.getLogger("fanout.worker")

ASSISTANT_ID = "assistant"
UNAVAILABLE = "The assistant is unavailable right now; please try again later."
# Replies in hand per generation slot (waiting for their turn or a slot).
QUEUED_PER_SLOT = 8
# How often the sessions being answered are checked for a pause, hand-off, close or
# delete: the longest a stopped session still gets deltas.
WATCH_INTERVAL = 0.25
# The longest back-off between two attempts at a reply.
RETRY_CAP = 5.0

T = TypeVar("T")


def reply_key(message_id: int) -> str:
    """The client id a reply is stored under: one reply per answered message."""
    return f"reply:{message_id}"


def message_body(message: MessageRecord) -> bytes:
    """A `message` frame for the bus (logged frames go without their leading "{")."""
    return encode(
        {"type": "message", "session_id": message.session_id, "message": message.to_json()}
    )[1:]


@dataclass(eq=False, slots=True)
class _Job:
    owed: OwedReply
    partition: int
    session: SessionRecord | None
    message: MessageRecord | None
    resumed: bool = False  # from a note: the reply may exist already
    noted: Awaitable[Any] | None = None  # the note's write, when it went without a wait
    stop: Stop = field(default_factory=Stop)
    generating: bool = False
    task: asyncio.Task[None] | None = None


class ReplyRunner:
    """Generates, stores and delivers the replies a worker owes."""

    def __init__(
        self,
        generator: ReplyGenerator,
        *,
        store: Store,
        bus: Bus,
        writer: BatchWriter,
        owed: OwedReplies,
        settings: Settings,
        context: RecentTurns | None = None,
    ) -> None:
        self._generator = generator
        self._store = store
        self._bus = bus
        self._writer = writer
        self._owed = owed
        self._settings = settings
        self._context = context
        self._slots = asyncio.Semaphore(settings.assistant_concurrency)
        self._admission = asyncio.Semaphore(settings.assistant_concurrency * QUEUED_PER_SLOT)
        self._jobs: dict[int, _Job] = {}  # by answered message id
        self._tails: dict[str, asyncio.Task[None]] = {}  # session -> its latest reply
        self._watcher: asyncio.Task[None] | None = None
        self.made = 0
        self.failed = 0
        self.interrupted = 0

    async def __aenter__(self) -> ReplyRunner:
        self._watcher = asyncio.create_task(self._watch(), name="reply-watcher")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        tasks = [job.task for job in self._jobs.values() if job.task is not None]
        if self._watcher is not None:
            tasks.append(self._watcher)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def in_hand(self) -> int:
        return len(self._jobs)

    async def owe(
        self, session: SessionRecord, message: MessageRecord, reply_id: int, *, fresh: bool
    ) -> None:
        """Note a reply as owed (durably, before returning) and make it in the background.

        `fresh`: the message was stored just now, so no note of it can exist yet and
        generation starts while the note is on its way to Redis. Otherwise (an entry
        processed again) an earlier note, with its reply id, is kept and used.
        """
        if message.id in self._jobs:
            return
        partition = partition_of(session.id, self._settings.partitions)
        owed = OwedReply(session.id, message.id, reply_id)
        if not fresh:
            owed = await self._owed.note(partition, owed)
            await self._admit(_Job(owed, partition, session, message))
            return
        job = _Job(owed, partition, session, message)
        job.noted = self._owed.record_soon(partition, owed)
        await self._admit(job)
        try:
            await job.noted
        except BaseException:
            # Not durable: the entry is not acknowledged and comes again; this attempt
            # must not leave a reply behind that no note covers.
            if job.task is not None:
                job.task.cancel()
            raise

    def seen(self, message: MessageRecord) -> None:
        """A message was stored: the context of the session's next replies has it."""
        if self._context is not None:
            self._context.seen(message)

    async def resume(self, partition: int) -> None:
        """Make the replies a partition's previous owner left owed (it was taken over)."""
        found = await self._owed.all(partition)
        for owed in found:
            await self._admit(_Job(owed, partition, None, None, resumed=True))
        if found:
            log.info("partition %d: resuming %d owed replies", partition, len(found))

    async def release(self, partition: int, grace: float) -> None:
        """A partition is given up: let its replies finish for `grace` s, cancel the rest."""
        if self._context is not None:
            self._context.forget_partition(partition)
        tasks = [j.task for j in self._jobs.values() if j.partition == partition and j.task]
        if not tasks:
            return
        if grace > 0:
            await asyncio.wait(tasks, timeout=grace)
        for task in tasks:
            task.cancel()  # the owed note stays: the next owner makes the reply
        await asyncio.gather(*tasks, return_exceptions=True)

    async def idle(self) -> None:
        """Wait until no reply is in hand (tests, benchmarks)."""
        while self._jobs:
            await asyncio.gather(
                *(j.task for j in list(self._jobs.values()) if j.task), return_exceptions=True
            )

    async def _admit(self, job: _Job) -> None:
        await self._admission.acquire()
        if job.owed.message_id in self._jobs:  # made meanwhile (a resume and a re-read)
            self._admission.release()
            return
        previous = self._tails.get(job.owed.session_id)
        task = asyncio.create_task(self._run(job, previous), name=f"reply-{job.owed.message_id}")
        job.task = task
        self._jobs[job.owed.message_id] = job
        self._tails[job.owed.session_id] = task
        task.add_done_callback(lambda done: self._forget(job, done))

    def _forget(self, job: _Job, task: asyncio.Task[None]) -> None:
        self._admission.release()
        self._jobs.pop(job.owed.message_id, None)
        if self._tails.get(job.owed.session_id) is task:
            del self._tails[job.owed.session_id]
        if not task.cancelled() and task.exception() is not None:
            log.error("reply to message %d failed: %r", job.owed.message_id, task.exception())

    async def _run(self, job: _Job, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            # Replies of a session in order. The previous one's outcome does not matter,
            # but the session may have changed while it ran: read it again.
            await asyncio.wait([previous])
            job.session = None
        async with self._slots:
            await self._make(job)

    async def _make(self, job: _Job) -> None:
        owed = job.owed
        loaded = await self._persist(lambda: self._load(job))
        if loaded is not None:
            session, message = loaded
            existing = None
            if job.resumed:  # the previous owner may have stored it before dying
                existing = await self._persist(
                    lambda: self._store.find_message(
                        session.id, ASSISTANT_ID, reply_key(message.id)
                    )
                )
            reply = existing or await self._generate(job, session, message)
            if reply is not None:
                self.seen(reply)
                await self._persist(lambda: self._deliver(session, reply))
        if job.noted is not None:
            await job.noted  # settled after it was noted, never before (owe raised if failed)
        await self._persist(lambda: self._owed.settle(job.partition, owed.message_id))

    async def _load(self, job: _Job) -> tuple[SessionRecord, MessageRecord] | None:
        """The session and message to answer; None if no reply is due any more."""
        session, message = job.session, job.message
        if session is not None and message is not None:
            return session, message
        session = await self._store.get_session(job.owed.session_id)
        if message is None and session is not None:
            message = await replies.message_by_id(self._store, session.id, job.owed.message_id)
        if session is None or message is None:
            return None  # deleted
        if not takes_assistant_reply(session.status, session.agent, message.role):
            return None  # paused, handed over or closed before its turn came
        return session, message

    async def _generate(
        self, job: _Job, session: SessionRecord, message: MessageRecord
    ) -> MessageRecord | None:
        """Stream, retrying failures; store the outcome (None: nothing to store)."""
        settings = self._settings
        delay = settings.assistant_retry_delay
        backoff = Backoff(first=delay, cap=max(delay, RETRY_CAP))
        attempt = Attempt("")
        # Deltas go out without a wait each: in order on the pipelined connection, and
        # their outcomes are collected after the reply is stored. A lost delta is no
        # loss (the stored reply has the text), so a failed one is only logged.
        published: list[Awaitable[None]] = []

        async def publish(text: str) -> None:
            delta = {
                "type": "message_delta",
                "session_id": session.id,
                "message_id": job.owed.reply_id,
                "delta": text,
            }
            frame = encode(delta)
            if self._bus.pipelined:
                published.append(self._bus.publish_soon(session.participants, frame))
            else:  # pooled connections keep no order between calls: one at a time
                published.append(self._bus.publish(session.participants, frame))
                await published.pop()

        job.generating = True
        try:
            for tried in range(settings.assistant_retries + 1):
                if tried:
                    await asyncio.sleep(backoff.next_delay())
                    if job.stop.requested:
                        return None
                attempt = await stream_reply(
                    self._generator.reply(session, message),
                    publish,
                    chunk_timeout=settings.assistant_timeout,
                    stop=job.stop,
                )
                if attempt.error is None or attempt.text:
                    break  # done, stopped, or failed after deltas went out (not repeatable)
                log.warning(
                    "reply to message %d: attempt %d failed: %r",
                    message.id,
                    tried + 1,
                    attempt.error,
                )
            job.generating = False
            return await self._persist(lambda: self._store_outcome(job, session, attempt))
        finally:
            job.generating = False
            for outcome in await asyncio.gather(*published, return_exceptions=True):
                if isinstance(outcome, Exception):
                    log.warning("a delta of reply %d was lost: %r", job.owed.reply_id, outcome)

    async def _store_outcome(
        self, job: _Job, session: SessionRecord, attempt: Attempt
    ) -> MessageRecord | None:
        key = reply_key(job.owed.message_id)
        if attempt.error is None and not attempt.interrupted:
            self.made += 1
            write = ReplyWrite(session.id, job.owed.reply_id, key, ASSISTANT_ID, attempt.text)
            try:
                return await self._writer.reply(write)
            except asyncpg.ForeignKeyViolationError:
                return None  # the session was deleted as the reply ended
        if attempt.text:  # stopped or failed part-way: keep what the users saw
            self.interrupted += 1
            role, content = "assistant", attempt.text
            metadata: dict[str, object] = {"interrupted": True}
            if attempt.error is not None:
                metadata["error"] = _describe(attempt.error)
        elif attempt.error is not None:
            self.failed += 1
            role, content = "system", UNAVAILABLE
            metadata = {"error": _describe(attempt.error)}
        else:
            return None  # stopped before a word: nothing to keep
        return await replies.store_reply(
            self._store,
            session_id=session.id,
            message_id=job.owed.reply_id,
            client_msg_id=key,
            role=role,
            user_id=ASSISTANT_ID,
            content=content,
            metadata=metadata,
        )

    async def _deliver(self, session: SessionRecord, reply: MessageRecord) -> None:
        # Keyed by the reply's id: a re-delivery after a crash keeps the first seq.
        await self._bus.deliver(
            session.participants, message_body(reply), delivery_key=f"m{reply.id}"
        )

    async def _persist(self, step: Callable[[], Awaitable[T]]) -> T:
        """Run a storage step, waiting out a Redis or Postgres outage in place."""
        backoff = retry_pacing()
        while True:
            try:
                return await step()
            except SERVICE_DOWN as exc:
                delay = backoff.next_delay()
                log.warning("reply step failed (%r); again in %.1fs", exc, delay)
                await asyncio.sleep(delay)

    async def _watch(self) -> None:
        """Stop the replies whose session no longer takes one."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            active = [job for job in self._jobs.values() if job.generating]
            if not active:
                continue
            try:
                states = await replies.reply_states(
                    self._store, list({job.owed.session_id for job in active})
                )
            except SERVICE_DOWN as exc:
                log.warning("reply watcher: cannot read sessions (%r)", exc)
                continue
            for job in active:
                state = states.get(job.owed.session_id)
                if state is None or not takes_assistant_reply(state[0], state[1], "user"):
                    job.stop.request()


def _describe(error: Exception) -> str:
    text = str(error) or type(error).__name__
    return f"{type(error).__name__}: {text}"[:300]
