"""A reply generator that streams slowly (FANOUT_ASSISTANT=tests.support.slow_assistant:make), so
a test can act while a reply is being streamed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from common.store.postgres import MessageRecord, SessionRecord

CHUNKS = 40
DELAY = 0.1


class Slow:
    """Answers with CHUNKS words, one every DELAY seconds."""

    async def reply(self, session: SessionRecord, message: MessageRecord) -> AsyncIterator[str]:
        for n in range(CHUNKS):
            await asyncio.sleep(DELAY)
            yield f"w{n} "


def make() -> Slow:
    return Slow()
