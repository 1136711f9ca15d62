"""Redis commands made in the same loop turn go out as one pipeline.

A worker serves many conversations at once and each delivery, delta and enqueue is
a command or two; sent one pipeline each, redis-py's per-call overhead (a pooled
connection, the retry wrapper, the pipeline's own bookkeeping) cost more than the
commands. `Pipeliner.call` queues a command and returns its reply; the queue is
sent at the next loop turn as one pipeline, without waiting for anything else, so
a lone command is not delayed and a burst shares one round trip. At most
MAX_PIPELINES are in flight; what comes meanwhile waits for the next.

Commands of one caller keep their order (one pipeline runs in order on one
connection, and a caller awaits each reply before its next command). Every command
gets its own reply or error: one failing command does not fail its neighbours.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis

# Commands per pipeline; a bigger burst is split (a pipeline's replies are buffered).
MAX_COMMANDS = 512
# Pipelines in flight at once (each holds a pooled connection). While they are all
# out, new commands wait and leave together in the next: under overload the wait
# grows, never the number of connections (the pool's bound then failed commands).
MAX_PIPELINES = 4


class Pipeliner:
    """Batches commands per loop turn onto a non-cluster Redis client."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        max_commands: int = MAX_COMMANDS,
        max_pipelines: int = MAX_PIPELINES,
    ) -> None:
        self._redis = redis
        self._max = max_commands
        self._max_pipelines = max_pipelines
        self._queue: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._scheduled = False
        self._sending: set[asyncio.Task[None]] = set()

    async def call(self, *args: Any) -> Any:
        """Run one command (in the next shared pipeline); its reply, or its error raised."""
        return await self.submit(*args)

    def submit(self, *args: Any) -> asyncio.Future[Any]:
        """Queue one command; a future of its reply (await several with gather)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()
        self._queue.append((args, done))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._send_all)
        return done

    async def close(self) -> None:
        """Wait for the pipelines in flight."""
        while self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)

    def _send_all(self) -> None:
        self._scheduled = False
        while self._queue and len(self._sending) < self._max_pipelines:
            batch, self._queue = self._queue[: self._max], self._queue[self._max :]
            task = asyncio.create_task(self._send(batch), name="redis-pipeline")
            self._sending.add(task)
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        if self._queue and not self._scheduled:
            self._send_all()

    async def _send(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for args, _ in batch:
                    pipe.execute_command(*args)
                replies: list[Any] = await pipe.execute(raise_on_error=False)
        except asyncio.CancelledError:
            for _, done in batch:
                done.cancel()
            raise
        except Exception as exc:  # the connection failed: no command has a reply
            for _, done in batch:
                if not done.done():
                    done.set_exception(exc)
            return
        for (_, done), reply in zip(batch, replies, strict=True):
            if done.done():
                continue  # its caller went away (cancelled)
            if isinstance(reply, Exception):
                done.set_exception(reply)
            else:
                done.set_result(reply)
