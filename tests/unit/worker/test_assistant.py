"""Reply generation logic without processes: delta coalescing, stops, timeouts, the SSE
parser and the FANOUT_ASSISTANT settings."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from common.config import ConfigError, Settings
from worker.assistant.base import GeneratorError
from worker.assistant.openai import _chunk, _sse_data
from worker.assistant.stream import Stop, stream_reply


class Published:
    """Records deltas; each publish takes `delay` s (a Redis round trip)."""

    def __init__(self, delay: float = 0.0) -> None:
        self.deltas: list[str] = []
        self._delay = delay

    async def __call__(self, text: str) -> None:
        self.deltas.append(text)
        await asyncio.sleep(self._delay)


async def _chunks(texts: list[str], gap: float = 0.0) -> AsyncIterator[str]:
    for text in texts:
        if gap:
            await asyncio.sleep(gap)
        yield text


async def test_chunks_ready_together_go_out_as_one_delta() -> None:
    published = Published(delay=0.05)
    attempt = await stream_reply(
        _chunks(["a", "b", "c", "d"]), published, chunk_timeout=1, stop=Stop()
    )
    assert attempt.text == "abcd" and attempt.error is None and not attempt.interrupted
    assert "".join(published.deltas) == "abcd"
    assert len(published.deltas) < 4, published.deltas


async def test_chunks_apart_in_time_go_out_one_by_one() -> None:
    published = Published()
    attempt = await stream_reply(
        _chunks(["a", "b", "c"], gap=0.03), published, chunk_timeout=1, stop=Stop()
    )
    assert published.deltas == ["a", "b", "c"] and attempt.text == "abc"


async def test_a_stalled_generator_times_out_with_what_it_said() -> None:
    async def stalls() -> AsyncIterator[str]:
        yield "so far"
        await asyncio.sleep(10)
        yield "never"

    attempt = await stream_reply(stalls(), Published(), chunk_timeout=0.1, stop=Stop())
    assert attempt.text == "so far"
    assert isinstance(attempt.error, TimeoutError)


async def test_a_generator_error_is_reported_not_raised() -> None:
    async def fails() -> AsyncIterator[str]:
        yield "x"
        raise GeneratorError("HTTP 503")

    attempt = await stream_reply(fails(), Published(), chunk_timeout=1, stop=Stop())
    assert (attempt.text, str(attempt.error)) == ("x", "HTTP 503")


async def test_a_stop_ends_the_attempt_and_closes_the_generator() -> None:
    closed = asyncio.Event()

    async def endless() -> AsyncIterator[str]:
        try:
            yield "part"
            await asyncio.sleep(10)
            yield "never"
        finally:
            closed.set()

    stop = Stop()
    published = Published()
    running = asyncio.create_task(stream_reply(endless(), published, chunk_timeout=5, stop=stop))
    while not published.deltas:
        await asyncio.sleep(0.01)
    stop.request()
    attempt = await asyncio.wait_for(running, 1)
    assert attempt.interrupted and attempt.text == "part" and attempt.error is None
    assert closed.is_set(), "the generator (and its HTTP response) is closed"


async def test_a_chunk_that_is_not_text_fails_the_attempt_and_nul_is_dropped() -> None:
    async def odd() -> AsyncIterator[object]:
        yield "a\x00b"
        yield b"bytes"

    attempt = await stream_reply(odd(), Published(), chunk_timeout=1, stop=Stop())  # type: ignore[arg-type]
    assert attempt.text == "ab"
    assert isinstance(attempt.error, TypeError)


def test_sse_lines_and_chunks() -> None:
    assert _sse_data(b"data: [DONE]\r\n") == b"[DONE]"
    assert _sse_data(b": keep-alive\n") is None
    assert _sse_data(b"\n") is None
    ok = b'{"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}'
    assert _chunk(ok) == ("Hi", False)
    assert _chunk(b'{"choices":[{"delta":{},"finish_reason":"stop"}]}') == ("", True)
    assert _chunk(b'{"choices":[]}') == ("", False)  # usage-only chunk
    for bad in (b"{not json", b"[1]", b'{"choices":[{"delta":{"content":5}}]}'):
        with pytest.raises(GeneratorError):
            _chunk(bad)
    with pytest.raises(GeneratorError, match="reported an error"):
        _chunk(b'{"error":{"message":"overloaded"}}')


def test_assistant_settings() -> None:
    assert Settings.from_env({}).assistant == "echo"
    s = Settings.from_env(
        {
            "FANOUT_ASSISTANT": "openai",
            "FANOUT_ASSISTANT_URL": "http://127.0.0.1:8000/v1",
            "FANOUT_ASSISTANT_MODEL": "m",
        }
    )
    assert (s.assistant_history, s.assistant_timeout, s.assistant_concurrency) == (20, 30, 32)
    assert Settings.from_env({"FANOUT_ASSISTANT": "my_pkg.bots:make"}).assistant == (
        "my_pkg.bots:make"
    )
    for bad in ("gpt", "my pkg:make", "mod:", "mod:a.b"):
        with pytest.raises(ConfigError, match="FANOUT_ASSISTANT must be"):
            Settings.from_env({"FANOUT_ASSISTANT": bad})
    with pytest.raises(ConfigError, match="needs FANOUT_ASSISTANT_URL"):
        Settings.from_env({"FANOUT_ASSISTANT": "openai"})
    with pytest.raises(ConfigError, match="FANOUT_ASSISTANT_URL must be"):
        Settings.from_env({"FANOUT_ASSISTANT_URL": "ftp://x"})
