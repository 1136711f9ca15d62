"""Pub/sub subscribers for the node's deployment: one connection, or one per cluster shard."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from common.config import Settings
from common.transport.cluster_pubsub import ShardedSubscriber
from common.transport.pubsub import ChannelSubscriber, MessageHandler, Subscriber


def open_subscriber(
    settings: Settings,
    redis: aioredis.Redis,
    on_message: MessageHandler,
    *,
    on_resubscribed: Callable[[], None] | None = None,
    probe: str | None = None,
) -> AbstractAsyncContextManager[ChannelSubscriber]:
    """A subscriber (enter it to connect); `probe` names a loop-back probe channel prefix."""
    interval = min(5.0, settings.lease_ttl / 2)
    if settings.redis_cluster:
        # Sharded pub/sub: a channel must be subscribed on the primary serving its slot.
        cluster = cast(RedisCluster, redis)
        return ShardedSubscriber(
            settings.redis_url,
            cluster,
            on_message,
            on_resubscribed=on_resubscribed,
            ping_interval=interval,
            probe_prefix=probe,
            publish=cluster.spublish if probe is not None else None,
        )
    return Subscriber(
        settings.redis_url,
        on_message,
        on_resubscribed=on_resubscribed,
        ping_interval=interval,
        probe=(probe.encode(), redis.publish) if probe is not None else None,
    )
