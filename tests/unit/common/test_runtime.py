"""common/runtime.py: a loop whose cancellation a library swallowed still stops."""

from __future__ import annotations

import asyncio
import contextlib

from common.runtime import raise_if_cancelled


async def test_a_swallowed_cancellation_still_stops_the_loop() -> None:
    started = asyncio.Event()
    laps = 0

    async def swallowing_call() -> None:
        started.set()
        with contextlib.suppress(asyncio.CancelledError):  # a misbehaving client library
            await asyncio.sleep(10)

    async def loop() -> None:
        nonlocal laps
        while True:
            await swallowing_call()
            raise_if_cancelled()
            laps += 1
            await asyncio.sleep(10)

    task = asyncio.create_task(loop())
    await started.wait()
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=2)
    assert done and task.cancelled() and laps == 0


async def test_an_uncancelled_task_goes_on() -> None:
    raise_if_cancelled()  # nothing pending: no exception
