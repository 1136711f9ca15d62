"""The node's pub/sub subscriber for its deployment: one connection, or one per shard."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from common.config import Settings
from common.keys import Keys
from common.pubsub import ChannelSubscriber, Subscriber
from common.pubsub_cluster import ShardedSubscriber
from node.hub import Hub


def open_subscriber(
    settings: Settings, redis: aioredis.Redis, keys: Keys, hub: Hub
) -> AbstractAsyncContextManager[ChannelSubscriber]:
    """A subscriber feeding `hub`, with a loop-back probe; enter it to connect."""
    interval = min(5.0, settings.lease_ttl / 2)
    if settings.redis_cluster:
        cluster = cast(RedisCluster, redis)
        return ShardedSubscriber(
            settings.redis_url,
            cluster,
            hub.on_message,
            on_resubscribed=hub.repair_all,
            ping_interval=interval,
            probe_prefix=keys.node_probe(settings.node_id),
            publish=cluster.spublish,
        )
    return Subscriber(
        settings.redis_url,
        hub.on_message,
        on_resubscribed=hub.repair_all,
        ping_interval=interval,
        probe=(keys.node_probe(settings.node_id).encode(), redis.publish),
    )
