"""What becomes of a partition's entries that fail (an outage is not a failure).

A failed entry stays pending and is delivered again; once it has been delivered
`max_attempts` times, it is moved to the partition's dead-letter stream (with why and
when) and acknowledged, so its conversation goes on without it. So is an entry that
cannot be decoded, at once.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis.asyncio as aioredis

from common.transport.entries import ChatEntry
from worker.partition_stream import PartitionStream

log = logging.getLogger("fanout.worker")

# The dead-letter stream keeps about this many entries (an approximate MAXLEN).
DEAD_LETTERS_KEPT = 10_000


class EntryFailures:
    """Counts one partition's failed entries and dead-letters those out of attempts."""

    def __init__(
        self,
        stream: PartitionStream,
        *,
        redis: aioredis.Redis,
        dead_letters: str,
        max_attempts: int,
    ) -> None:
        self._stream = stream
        self._redis = redis
        self._dead_letters = dead_letters
        self._max_attempts = max_attempts
        self.failures = 0
        self.dead_lettered = 0

    async def failed(self, entry_id: bytes, entry: ChatEntry, exc: Exception) -> bool:
        """Record a failure; True if the entry was dead-lettered (its conversation goes on)."""
        self.failures += 1
        attempts = await self._stream.attempts(entry_id)
        log.error(
            "partition %d: entry %s failed (attempt %d/%d): %r",
            self._stream.partition,
            entry_id.decode(),
            attempts,
            self._max_attempts,
            exc,
        )
        if attempts < self._max_attempts:
            return False
        await self.dead_letter(entry_id, {b"c": entry.encode()}, repr(exc))
        return True

    async def dead_letter(self, entry_id: bytes, fields: dict[bytes, bytes], reason: str) -> None:
        """Move an entry to the dead-letter stream and acknowledge it."""
        self.dead_lettered += 1
        record: dict[Any, Any] = {
            **fields,
            b"entry_id": entry_id,
            b"reason": reason[:1000].encode(),
            b"at": str(int(time.time() * 1000)).encode(),
        }
        await self._redis.xadd(
            self._dead_letters, record, maxlen=DEAD_LETTERS_KEPT, approximate=True
        )
        await self._stream.ack([entry_id])
