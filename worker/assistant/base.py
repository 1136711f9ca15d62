"""The reply generator seam: what a worker asks of whatever writes the assistant's replies."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from common.store.postgres import MessageRecord, SessionRecord


class ReplyGenerator(Protocol):
    """Streams an assistant reply to a user message as text chunks.

    Raising (anything but CancelledError) fails the attempt: the worker retries it with
    back-off, then stores a `system` message saying the assistant is unavailable.
    """

    def reply(self, session: SessionRecord, message: MessageRecord) -> AsyncIterator[str]: ...


class GeneratorError(Exception):
    """A reply generator's backend failed (HTTP error, malformed stream)."""
