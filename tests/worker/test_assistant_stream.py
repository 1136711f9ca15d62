"""One attempt at a reply (worker/assistant/stream.py): the gap between chunks, in process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from worker.assistant.stream import QUEUE_SIZE, Stop, stream_reply


async def _chunks(texts: list[str], *, then_wait: float = 0.0) -> AsyncIterator[str]:
    for text in texts:
        yield text
    if then_wait:
        await asyncio.sleep(then_wait)


async def test_a_gap_longer_than_the_timeout_fails_the_attempt_with_what_went_out() -> None:
    sent: list[str] = []

    async def publish(text: str) -> None:
        sent.append(text)

    attempt = await asyncio.wait_for(
        stream_reply(_chunks(["a", "b"], then_wait=10), publish, chunk_timeout=0.1, stop=Stop()),
        5,
    )
    assert isinstance(attempt.error, TimeoutError)
    assert attempt.text == "ab" == "".join(sent)
    assert not attempt.interrupted


async def test_chunks_spaced_within_the_timeout_make_the_whole_reply() -> None:
    async def slow() -> AsyncIterator[str]:
        for text in ["x", "y", "z"]:
            await asyncio.sleep(0.06)
            yield text

    async def publish(text: str) -> None:
        pass

    attempt = await stream_reply(slow(), publish, chunk_timeout=0.1, stop=Stop())
    assert attempt.error is None and attempt.text == "xyz"


async def test_waiting_for_the_deltas_to_catch_up_is_no_gap() -> None:
    """The pump waits on a full queue while publishing is slow: that is not the model's gap."""
    texts = [str(i % 10) for i in range(QUEUE_SIZE * 3)]
    calls = 0

    async def publish(text: str) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(0.3)  # the queue fills up meanwhile

    attempt = await stream_reply(_chunks(texts), publish, chunk_timeout=0.1, stop=Stop())
    assert attempt.error is None and attempt.text == "".join(texts)


async def test_a_stop_during_a_gap_interrupts_without_an_error() -> None:
    stop = Stop()

    async def publish(text: str) -> None:
        asyncio.get_running_loop().call_later(0.05, stop.request)

    attempt = await asyncio.wait_for(
        stream_reply(_chunks(["a"], then_wait=10), publish, chunk_timeout=5, stop=stop), 5
    )
    assert attempt.interrupted and attempt.error is None and attempt.text == "a"
