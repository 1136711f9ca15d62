"""The delivery script against the real Redis: seqs, idempotency, and a flushed script cache."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import redis.asyncio as aioredis

from common.config import Settings
from common.transport.bus import Bus
from common.transport.connection import RespConnection, address_of, command_connection


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


class _CountingConnection(RespConnection):
    """The shared command connection, counting the delivery script calls sent on it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.script_calls = 0

    def submit(self, *args: bytes | str | int | float) -> asyncio.Future[Any]:
        self.script_calls += args[0] == "EVALSHA"
        return super().submit(*args)


async def test_one_script_call_serves_up_to_a_hundred_users_and_keeps_their_seqs(
    redis: aioredis.Redis, settings: Settings
) -> None:
    commands = _CountingConnection(address_of(redis))
    try:
        bus = Bus(redis, settings, commands)
        users = [f"many{i}" for i in range(250)]
        later = [f"late{i}" for i in range(50)]
        await bus.deliver(later, b'"type":"notification"}')  # seq 1 for the late ones
        commands.script_calls = 0
        assert await bus.deliver(users, b'"type":"notification"}', "k1") == dict.fromkeys(users, 1)
        assert commands.script_calls == 3, "250 users: calls of 100, 100 and 50"
        # The same delivery again, grouped differently and with users it had not reached:
        # those it reached keep their seq, the others get their next one.
        again = await bus.deliver(users[::-1][:120] + later, b'"type":"notification"}', "k1")
        assert again == {**dict.fromkeys(users[::-1][:120], 1), **dict.fromkeys(later, 2)}
        for user in (users[0], users[249], later[0]):
            assert len(await bus.log_after(user, 0)) == (2 if user in later else 1), user
    finally:
        await commands.close()


async def test_a_log_keeps_at_least_its_length(redis: aioredis.Redis, settings: Settings) -> None:
    body = b'"type":"notification"}'
    short = Bus(redis, replace(settings, user_log_maxlen=5))
    for _ in range(8):
        await short.deliver(["shorty"], body)
    assert [f[:9] for f in await short.log_after("shorty", 0)][0] == b'{"seq":4,', (
        "a short log is trimmed exactly"
    )
    assert len(await short.log_after("shorty", 0)) == 5
    # From 1,000 entries on, trimming is approximate: never below the length.
    async with command_connection(redis, cluster=False) as commands:
        long = Bus(redis, replace(settings, user_log_maxlen=1000), commands)
        await asyncio.gather(*(long.deliver(["longy"], body) for _ in range(1300)))
    kept = await redis.xlen(long.keys.log("longy"))
    assert 1000 <= kept < 1300, kept
