"""One attempt at a reply: a generator's chunks out as coalesced deltas, until it ends,
fails, stalls or is told to stop.

The generator runs in a task of its own (the pump) that feeds a bounded queue; this
side takes everything the queue holds, waits up to COALESCE s from the first of them
for more, and publishes them as one delta: a model that streams a token a millisecond
costs one PUBLISH per few ms, not one per token. The end of the stream is never waited
for: the last delta goes out the moment it is known to be the last. What was published
is exactly what the attempt returns as its text. `publish` is expected to hand the
delta over without waiting for Redis (the runner pipelines it).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

# Chunks made but not yet published; at the bound the pump waits (the model's stream
# is not read further until the deltas catch up).
QUEUE_SIZE = 256
# Seconds a delta waits for more chunks to join it.
COALESCE = 0.003


class Stop:
    """Asks a running attempt to end early (the session was paused, closed, deleted)."""

    def __init__(self) -> None:
        self.requested = False
        self._wake: Callable[[], None] | None = None

    def request(self) -> None:
        self.requested = True
        if self._wake is not None:
            self._wake()


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one attempt produced: the text published, and why it ended if not by itself."""

    text: str
    error: Exception | None = None
    interrupted: bool = False


class _End:
    pass


@dataclass(frozen=True, slots=True)
class _Failed:
    error: Exception


_END = _End()
Item = str | _End | _Failed


async def stream_reply(
    chunks: AsyncIterator[str],
    publish: Callable[[str], Awaitable[None]],
    *,
    chunk_timeout: float,
    stop: Stop,
) -> Attempt:
    """Publish `chunks` as deltas; a gap longer than `chunk_timeout` s fails the attempt."""
    queue: asyncio.Queue[Item] = asyncio.Queue(QUEUE_SIZE)
    pump = asyncio.create_task(_pump(chunks, queue, chunk_timeout), name="reply-pump")

    def wake() -> None:
        pump.cancel()
        # The queue is full only while this side is busy publishing; it then sees
        # `stop.requested` before it reads again.
        with contextlib.suppress(asyncio.QueueFull):
            queue.put_nowait(_END)

    stop._wake = wake
    parts: list[str] = []
    try:
        while not stop.requested:
            batch, last = _take_all(await queue.get(), queue)
            if last is None:
                batch, last = await _gather_more(batch, queue)
            if batch and not stop.requested:
                parts.append(batch)
                await publish(batch)
            if stop.requested:
                break
            if isinstance(last, _Failed):
                return Attempt("".join(parts), error=last.error)
            if isinstance(last, _End):
                return Attempt("".join(parts))
        return Attempt("".join(parts), interrupted=True)
    finally:
        stop._wake = None
        pump.cancel()
        # Owned: the pump (and the generator's HTTP response) is gone before we return.
        await asyncio.gather(pump, return_exceptions=True)


async def _gather_more(batch: str, queue: asyncio.Queue[Item]) -> tuple[str, Item | None]:
    """Add the chunks that come within COALESCE s, or until the stream ends or fails."""
    last: Item | None = None
    try:
        async with asyncio.timeout(COALESCE):
            while last is None:
                more, last = _take_all(await queue.get(), queue)
                batch += more
    except TimeoutError:
        pass  # the window closed: publish what there is
    return batch, last


def _take_all(first: Item, queue: asyncio.Queue[Item]) -> tuple[str, Item | None]:
    """The chunks ready now joined, and the marker that ended them (None: none yet)."""
    texts: list[str] = []
    item: Item | None = first
    while isinstance(item, str):
        texts.append(item)
        item = None if queue.empty() else queue.get_nowait()
    return "".join(texts), item


async def _pump(chunks: AsyncIterator[str], queue: asyncio.Queue[Item], gap: float) -> None:
    loop = asyncio.get_running_loop()
    try:
        # One deadline for the whole stream, moved on as chunks come (not a timeout
        # entered and left per chunk): the gap counts only while the generator is
        # awaited, not while the pump waits for the deltas to catch up.
        async with asyncio.timeout(None) as deadline:
            while True:
                deadline.reschedule(loop.time() + gap)
                try:
                    chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                deadline.reschedule(None)
                if not isinstance(chunk, str):
                    raise TypeError(f"a reply generator yielded {type(chunk).__name__}, not str")
                # Postgres text cannot hold NUL: the stored reply must equal the deltas.
                chunk = chunk.replace("\x00", "")
                if chunk:
                    await queue.put(chunk)
    except Exception as exc:  # a failed attempt (TimeoutError: a gap), for the publishing side
        await queue.put(_Failed(exc))
        return
    finally:
        close = getattr(chunks, "aclose", None)
        if close is not None:
            with contextlib.suppress(Exception):
                await close()
    await queue.put(_END)
