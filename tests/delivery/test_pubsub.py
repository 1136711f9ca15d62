"""The node's pub/sub subscriber against the real Redis: its liveness check does not
mistake a healthy connection for a dead one."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from common.localcluster.embedded import Services
from common.transport.pubsub import Subscriber


async def test_a_subscriber_without_channels_answers_its_pings(services: Services) -> None:
    # Before any SUBSCRIBE, Redis answers PING with a plain PONG (not [pong, ""]).
    async with Subscriber(services.redis_url, lambda c, d: None, ping_interval=0.1) as sub:
        await asyncio.sleep(0.8)  # four ping rounds, each given 0.2 s
        assert sub.reconnects == 0


async def test_a_probed_subscriber_stays_connected_and_delivers(
    services: Services, namespace: str
) -> None:
    redis = aioredis.Redis.from_url(services.redis_url)
    got: list[bytes] = []
    probe = f"{namespace}probe".encode()
    channel = f"{namespace}c".encode()
    try:
        async with Subscriber(
            services.redis_url,
            lambda c, d: got.append(d),
            ping_interval=0.1,
            probe=(probe, redis.publish),
        ) as sub:
            await sub.subscribe([channel])
            await asyncio.sleep(0.8)
            await redis.publish(channel, b"hello")
            await asyncio.sleep(0.1)
            assert sub.reconnects == 0
            assert got == [b"hello"]
    finally:
        await redis.aclose()
