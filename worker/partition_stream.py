"""One partition stream as one consumer of the consumer group sees it.

The stream commands a partition consumer (worker/consumer.py) sends: create the group,
adopt the entries earlier owners left pending, read, acknowledge, trim what is
acknowledged, and hand pending entries over when the partition is let go. Which
entries to process, in what order, and what a failure means is the consumer's business.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from common.transport.connection import RespConnection, address_of
from common.transport.keys import CONSUMER_GROUP

log = logging.getLogger("fanout.worker")

BATCH = 100
TRIM_INTERVAL = 1.0

Entry = tuple[bytes, dict[bytes, bytes]]


class PartitionStream:
    """A partition's stream read through the consumer group as `consumer`."""

    def __init__(
        self,
        partition: int,
        *,
        redis: aioredis.Redis,
        stream: str,
        consumer: str,
        claim_idle: float,
        commands: RespConnection | None = None,
    ) -> None:
        self.partition = partition
        self.key = stream
        self._redis = redis
        self._consumer = consumer
        self._claim_idle = claim_idle
        self._commands = commands
        # Stream reads block, so they cannot share `commands`; they get a lean
        # connection of their own where there is a shared one (not in cluster mode).
        self._reader = RespConnection(address_of(redis)) if commands is not None else None
        self._trimmed_at = 0.0

    async def close(self) -> None:
        """Close the lean read connection, if there is one."""
        if self._reader is not None:
            await self._reader.close()

    async def ensure_group(self) -> None:
        """Create the consumer group (and the stream) unless it exists."""
        try:
            # From id 0: input enqueued before any worker ever ran is processed too.
            await self._redis.xgroup_create(self.key, CONSUMER_GROUP, id="0", mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def adopt_orphans(self, *, stopping: Callable[[], bool]) -> None:
        """Claim entries left pending by earlier owners before reading anything new.

        Order matters: a conversation's old entries must run before its new ones, so
        this waits until every other consumer's pending entries are idle long enough
        to be claimed (FANOUT_CLAIM_IDLE), then takes them all. It gives up waiting
        once `stopping()` is true.
        """
        idle_ms = int(self._claim_idle * 1000)
        claimed = 0
        while not stopping():
            start: Any = "0-0"
            while True:
                # Not JUSTID: redis-py drops the cursor from that form's reply.
                reply: Any = await self._redis.xautoclaim(
                    self.key, CONSUMER_GROUP, self._consumer, idle_ms, start, count=BATCH
                )
                start, claimed = reply[0], claimed + len(reply[1])
                if start in (b"0-0", "0-0"):
                    break
            others = [
                c
                for c in await self._redis.xinfo_consumers(self.key, CONSUMER_GROUP)
                if c["name"].decode() != self._consumer
            ]
            if not any(c["pending"] for c in others):
                for c in others:  # stale consumers of dead or departed workers
                    await self._redis.xgroup_delconsumer(self.key, CONSUMER_GROUP, c["name"])
                if claimed:
                    log.info("partition %d: reclaimed %d pending entries", self.partition, claimed)
                return
            await asyncio.sleep(min(1.0, self._claim_idle / 4))

    async def read(self, start: str, block: int | None = None) -> list[Entry]:
        """Up to BATCH entries from `start` (">": new ones, "0": our pending ones)."""
        if self._reader is not None:
            entries = await self._read_lean(start, block)
        else:
            reply: Any = await self._redis.xreadgroup(
                CONSUMER_GROUP,
                self._consumer,
                {self.key: start},
                count=BATCH,
                block=block,
            )
            entries = reply[0][1] if reply else []
        # An entry deleted (trimmed) while pending comes back with no fields: just ack it.
        gone = [eid for eid, fields in entries if not fields]
        if gone:
            await self.ack(gone)
        return [(eid, fields) for eid, fields in entries if fields]

    async def _read_lean(self, start: str, block: int | None) -> list[Entry]:
        """XREADGROUP on this consumer's own lean connection (a blocking read holds it)."""
        assert self._reader is not None
        args: list[str | int] = ["GROUP", CONSUMER_GROUP, self._consumer, "COUNT", BATCH]
        if block is not None:
            args += ["BLOCK", block]
        reply: Any = await self._reader.call("XREADGROUP", *args, "STREAMS", self.key, start)
        if not reply:
            return []
        # [[stream, [[id, [field, value, ...] or nil], ...]]]
        return [
            (entry_id, dict(zip(flat[::2], flat[1::2], strict=True)) if flat else {})
            for entry_id, flat in reply[0][1]
        ]

    async def ack(self, entry_ids: list[bytes]) -> None:
        """Acknowledge entries with a command of their own."""
        await self._redis.xack(self.key, CONSUMER_GROUP, *entry_ids)

    async def ack_with_deliveries(self, entry_ids: list[bytes]) -> None:
        """Acknowledge entries in the write the worker's deliveries go out in, where
        there is a shared command connection: no round trip of their own."""
        if self._commands is not None:
            await self._commands.call("XACK", self.key, CONSUMER_GROUP, *entry_ids)
        else:
            await self.ack(entry_ids)

    async def attempts(self, entry_id: bytes) -> int:
        """How many times a pending entry has been delivered (1 if it is not pending)."""
        info = await self._redis.xpending_range(
            self.key, CONSUMER_GROUP, min=entry_id, max=entry_id, count=1
        )
        return int(info[0]["times_delivered"]) if info else 1

    async def trim(self) -> None:
        """Drop acknowledged entries: the stream holds only what is not yet processed."""
        now = time.monotonic()
        if now - self._trimmed_at < TRIM_INTERVAL:
            return
        self._trimmed_at = now
        groups = await self._redis.xinfo_groups(self.key)
        group = next((g for g in groups if g["name"] == CONSUMER_GROUP.encode()), None)
        if group is None:
            return
        floor: bytes = group["last-delivered-id"]
        pending = await self._redis.xpending(self.key, CONSUMER_GROUP)
        if pending["pending"]:
            floor = min(floor, pending["min"], key=_stream_id)
            await self._redis.xtrim(self.key, minid=floor, approximate=False)
        else:
            # Everything up to last-delivered is acknowledged: keep only newer entries.
            ms, seq = _stream_id(floor)
            await self._redis.xtrim(self.key, minid=f"{ms}-{seq + 1}", approximate=False)

    async def hand_over(self, count: int) -> None:
        """Stopped with entries still pending (failing ones): mark up to `count` of them
        idle so the next owner claims them at once, not after FANOUT_CLAIM_IDLE (nothing
        here runs them any more once this returns)."""
        mine: Any = await self._redis.xpending_range(
            self.key,
            CONSUMER_GROUP,
            min="-",
            max="+",
            count=count,
            consumername=self._consumer,
        )
        if mine:
            await self._redis.xclaim(
                self.key,
                CONSUMER_GROUP,
                self._consumer,
                0,
                [p["message_id"] for p in mine],
                idle=int(self._claim_idle * 1000),
                justid=True,
            )


def _stream_id(raw: bytes) -> tuple[int, int]:
    ms, _, seq = raw.decode().partition("-")
    return int(ms), int(seq or 0)
