"""The delivery script against the real Redis: seqs, idempotency, and a flushed script cache."""

from __future__ import annotations

import redis.asyncio as aioredis

from common.config import Settings
from common.transport.bus import Bus
from common.transport.connection import command_connection


async def test_deliver_assigns_seqs_once_and_survives_a_script_flush(
    redis: aioredis.Redis, settings: Settings
) -> None:
    bus = Bus(redis, settings)
    assert await bus.deliver(["ann", "ben"], b'"type":"notification"}', "k1") == {
        "ann": 1,
        "ben": 1,
    }
    assert await bus.deliver(["ann"], b'"type":"notification"}', "k1") == {"ann": 1}, (
        "the same delivery keeps its seq"
    )
    # Redis lost its script cache (restart, failover, SCRIPT FLUSH): EVALSHA fails
    # with NOSCRIPT, the bus loads the script again and the delivery still happens once.
    await redis.script_flush()
    assert await bus.deliver(["ann", "ben"], b'"type":"notification"}', "k2") == {
        "ann": 2,
        "ben": 2,
    }
    assert [f[:9] for f in await bus.log_after("ann", 0)] == [b'{"seq":1,', b'{"seq":2,']


async def test_the_shared_connection_delivers_the_same_way(
    redis: aioredis.Redis, settings: Settings
) -> None:
    async with command_connection(redis, cluster=False) as commands:
        bus = Bus(redis, settings, commands)
        assert await bus.deliver(["ann", "ben"], b'"type":"notification"}', "k1") == {
            "ann": 1,
            "ben": 1,
        }
        assert await bus.deliver(["ann"], b'"type":"notification"}', "k1") == {"ann": 1}
        await redis.script_flush()
        assert await bus.deliver(["ann", "ben"], b'"type":"notification"}', "k2") == {
            "ann": 2,
            "ben": 2,
        }
        assert [f[:9] for f in await bus.log_after("ben", 0)] == [b'{"seq":1,', b'{"seq":2,']
        entry = await bus.enqueue(0, b"{}")
        assert await redis.xlen(bus.keys.partition_stream(0)) == 1 and entry.count(b"-") == 1
