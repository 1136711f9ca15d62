"""A user's own reply generator, loaded by FANOUT_ASSISTANT=tests.support.assistant_plugin:make.

Written the way the README's "Reply generators" section tells a user to write one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from common.store.postgres import MessageRecord, SessionRecord


class Shouter:
    """Answers in capitals, a word per chunk, naming the session's owner."""

    async def reply(self, session: SessionRecord, message: MessageRecord) -> AsyncIterator[str]:
        yield f"{session.owner}:"
        for word in message.content.split():
            yield " " + word.upper()


def make() -> Shouter:
    return Shouter()
