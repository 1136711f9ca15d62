"""The built-in deterministic assistant (no network): the default, for tests and demos."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from common.store.postgres import MessageRecord, SessionRecord


class EchoAssistant:
    """Answers every message with a fixed, content-derived text in word-sized chunks.

    Deterministic so tests can assert the exact reply; `delay` spaces the chunks the
    way a language model would stream them.
    """

    def __init__(self, *, delay: float = 0.0, words_per_chunk: int = 3) -> None:
        self._delay = delay
        self._words = words_per_chunk

    async def reply(self, session: SessionRecord, message: MessageRecord) -> AsyncIterator[str]:
        words = f"You said: {message.content}".split(" ")
        for start in range(0, len(words), self._words):
            if self._delay:
                await asyncio.sleep(self._delay)
            chunk = " ".join(words[start : start + self._words])
            yield chunk if start == 0 else " " + chunk
