"""Queue depth of the conversation partitions: entries not yet acknowledged (SPEC §2)."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from common.transport.keys import CONSUMER_GROUP, Keys


async def queue_depths(redis: aioredis.Redis, keys: Keys, partitions: int) -> dict[int, int]:
    """Lag plus pending of the workers' group, per partition (a missing stream is 0)."""
    async with redis.pipeline(transaction=False) as pipe:
        for partition in range(partitions):
            pipe.xinfo_groups(keys.partition_stream(partition))
            pipe.xlen(keys.partition_stream(partition))
        replies = await pipe.execute(raise_on_error=False)
    depths: dict[int, int] = {}
    for partition in range(partitions):
        groups, length = replies[2 * partition], replies[2 * partition + 1]
        depths[partition] = _depth(groups, length)
    return depths


def _depth(groups: Any, length: Any) -> int:
    if isinstance(groups, redis.exceptions.ResponseError) or not isinstance(length, int):
        return 0  # no stream yet
    for group in groups:
        if group["name"] == CONSUMER_GROUP.encode():
            lag = group.get("lag")
            # Redis reports no lag when it cannot tell (after deletions): count the
            # whole stream then, which is an upper bound since acked entries are trimmed.
            return int(group["pending"]) + (int(lag) if lag is not None else length)
    return length  # no worker has ever run: everything is waiting
