"""Group commit: the chats and replies that are ready together go to Postgres together.

Every conversation task asks the `BatchWriter` to store its message and waits for
the answer. Requests that arrive while a flush is running (or in the same loop turn
as the first) wait for the next flush, which takes them all, up to `max_batch`, in
one transaction (common/store/batch.py). At low load a request is flushed at once,
alone; under load a flush carries many, and the cost per message falls.

One bad request must not fail the others: when a batch fails with anything but an
outage, its requests are written again one by one, so only the bad one raises (and
its entry is retried, then dead-lettered, by the consumer). An outage (SERVICE_DOWN)
fails the whole batch; each caller retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import asyncpg

from common.errors import SERVICE_DOWN
from common.store.batch import ChatWritten, ReplyWrite, write_batch
from common.store.postgres import MessageRecord, Store
from common.transport.entries import ChatEntry

log = logging.getLogger("fanout.worker")

# Requests per transaction: large enough to amortise the round trips, small enough
# that one transaction holds few row locks and a failed batch is cheap to redo.
MAX_BATCH = 128
# Transactions in flight at once; more requests wait for the next flush. One: Postgres'
# CPU per chat is mostly per transaction (the batch function's fixed statements and the
# commit: scripts/bench_pg_calls.py), and with one in flight the requests that arrive
# meanwhile share the next. At 1,000 chats/s this halved the calls and cut Postgres' CPU
# per chat by 16% against two, latency unchanged within the noise (README Benchmarks,
# issue 17); two flushes of one worker could also deadlock (one's session locks against
# the other's foreign-key checks), and each failure was redone one by one.
MAX_FLUSHES = 1

Request = ChatEntry | ReplyWrite
Result = ChatWritten | MessageRecord | None
Write = Callable[
    [asyncpg.Connection, list[ChatEntry], list[ReplyWrite]],
    Awaitable[tuple[list[ChatWritten | None], list[MessageRecord]]],
]


@dataclass(slots=True)
class _Pending:
    request: Request
    done: asyncio.Future[Result] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class BatchWriter:
    """Stores chat entries and assistant replies in shared transactions."""

    def __init__(
        self,
        store: Store,
        *,
        max_batch: int = MAX_BATCH,
        max_flushes: int = MAX_FLUSHES,
        write: Write = write_batch,
    ) -> None:
        self._store = store
        self._max_batch = max_batch
        self._max_flushes = max_flushes
        self._write = write
        self._queue: list[_Pending] = []
        self._flushes: set[asyncio.Task[None]] = set()
        self._scheduled = False
        self.batches = 0
        self.written = 0

    async def chat(self, entry: ChatEntry) -> ChatWritten | None:
        """Store a chat entry (once); None if its session no longer exists."""
        result = await self._submit(entry)
        assert result is None or isinstance(result, ChatWritten)
        return result

    async def reply(self, reply: ReplyWrite) -> MessageRecord:
        """Store an assistant reply (once); the row as stored."""
        result = await self._submit(reply)
        assert isinstance(result, MessageRecord)
        return result

    async def close(self) -> None:
        """Wait for the flushes in flight (their callers are waiting for them too)."""
        while self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)

    async def _submit(self, request: Request) -> Result:
        pending = _Pending(request)
        self._queue.append(pending)
        if not self._scheduled:
            # Not at once: requests made in this loop turn join the same flush.
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._start_flushes)
        return await pending.done

    def _start_flushes(self) -> None:
        self._scheduled = False
        while self._queue and len(self._flushes) < self._max_flushes:
            batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
            task = asyncio.create_task(self._flush(batch), name="batch-writer")
            self._flushes.add(task)
            task.add_done_callback(self._flushed)

    def _flushed(self, task: asyncio.Task[None]) -> None:
        self._flushes.discard(task)
        if self._queue and not self._scheduled:
            self._start_flushes()

    async def _flush(self, batch: list[_Pending]) -> None:
        try:
            await self._run(batch)
        except asyncio.CancelledError:
            for pending in batch:
                if not pending.done.done():
                    pending.done.cancel()
            raise
        except SERVICE_DOWN as exc:
            _fail(batch, exc)
        except Exception as exc:
            if len(batch) == 1:
                _fail(batch, exc)
                return
            log.warning("a batch of %d failed (%r); writing them one by one", len(batch), exc)
            for pending in batch:
                try:
                    await self._run([pending])
                except asyncio.CancelledError:
                    raise
                except Exception as one:
                    _fail([pending], one)

    async def _run(self, batch: list[_Pending]) -> None:
        chats: list[ChatEntry] = []
        replies: list[ReplyWrite] = []
        for pending in batch:
            if isinstance(pending.request, ChatEntry):
                chats.append(pending.request)
            else:
                replies.append(pending.request)
        async with self._store.acquire() as conn:
            written, stored = await self._write(conn, chats, replies)
        self.batches += 1
        self.written += len(batch)
        # Results come back chats first, then replies, each in the order given.
        waiting = [p for p in batch if isinstance(p.request, ChatEntry)]
        waiting += [p for p in batch if not isinstance(p.request, ChatEntry)]
        for pending, result in zip(waiting, [*written, *stored], strict=True):
            if not pending.done.done():
                pending.done.set_result(result)


def _fail(batch: list[_Pending], exc: BaseException) -> None:
    for pending in batch:
        if not pending.done.done():
            pending.done.set_exception(exc)
            # The caller may have gone (cancelled): do not log "never retrieved".
            with contextlib.suppress(BaseException):
                pending.done.exception()
