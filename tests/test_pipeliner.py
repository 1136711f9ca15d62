"""Shared pipelines against the real Redis: one per loop turn, a reply (or error) each."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from common.pipeliner import Pipeliner


class CountingRedis:
    """Hands out the real client's pipelines and counts them."""

    def __init__(self, real: aioredis.Redis) -> None:
        self.real = real
        self.pipelines = 0

    def pipeline(self, *, transaction: bool) -> object:
        self.pipelines += 1
        return self.real.pipeline(transaction=transaction)


async def test_commands_of_one_turn_share_a_pipeline_and_keep_their_order(
    redis: aioredis.Redis, namespace: str
) -> None:
    counting = CountingRedis(redis)
    pipeliner = Pipeliner(counting)  # type: ignore[arg-type]
    key = f"{namespace}counter"
    replies = await asyncio.gather(*(pipeliner.call("INCR", key) for _ in range(50)))
    assert replies == list(range(1, 51)), "each caller gets its own reply, in order"
    assert counting.pipelines == 1
    # A lone command is sent at once, in a pipeline of its own.
    assert await pipeliner.call("GET", key) == b"50"
    assert counting.pipelines == 2


async def test_a_failing_command_fails_alone(redis: aioredis.Redis, namespace: str) -> None:
    pipeliner = Pipeliner(redis)
    text, number = f"{namespace}text", f"{namespace}number"
    await redis.set(text, "not a number")
    good, bad, after = await asyncio.gather(
        pipeliner.call("INCR", number),
        pipeliner.call("INCR", text),
        pipeliner.call("INCR", number),
        return_exceptions=True,
    )
    assert (good, after) == (1, 2)
    assert isinstance(bad, ResponseError)


async def test_bursts_are_split_and_pipelines_in_flight_are_bounded(
    redis: aioredis.Redis, namespace: str
) -> None:
    counting = CountingRedis(redis)
    pipeliner = Pipeliner(counting, max_commands=10, max_pipelines=2)  # type: ignore[arg-type]
    key = f"{namespace}burst"
    replies = await asyncio.gather(*(pipeliner.call("RPUSH", key, i) for i in range(95)))
    assert sorted(replies) == list(range(1, 96))
    assert counting.pipelines == 10, "95 commands at 10 a pipeline"
    assert await redis.lrange(key, 0, -1) == [str(i).encode() for i in range(95)]


async def test_a_dead_connection_fails_every_waiting_command() -> None:
    dead = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=1)
    pipeliner = Pipeliner(dead)
    try:
        results = await asyncio.gather(
            *(pipeliner.call("PING") for _ in range(3)), return_exceptions=True
        )
        assert all(isinstance(r, RedisConnectionError) for r in results)
        with pytest.raises(RedisConnectionError):
            await pipeliner.call("PING")
    finally:
        await dead.aclose()
