"""The lean pipelined connection against the real Redis (and a proxy that cuts or freezes)."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from common.transport.connection import (
    RespConnection,
    address_from_url,
    address_of,
    auth_command,
    pack,
)
from tests.support.proxy import CuttableProxy


def test_one_address_description_for_the_command_and_pub_sub_connections() -> None:
    address = address_from_url("rediss://ops:pw@cache:6380/2")
    assert address == {
        "host": "cache",
        "port": 6380,
        "path": None,
        "tls": True,
        "db": 2,
        "username": "ops",
        "password": "pw",
    }
    assert address_of(aioredis.Redis.from_url("rediss://ops:pw@cache:6380/2")) == address
    assert auth_command(address) == pack("AUTH", "ops", "pw")
    assert auth_command(address_from_url("redis://:pw@cache")) == pack("AUTH", "pw")
    assert auth_command(address_from_url("redis://cache")) is None
    assert address_from_url("unix:///run/redis.sock?db=1")["path"] == "/run/redis.sock"


def test_pack_is_resp() -> None:
    assert pack("SET", b"k", 5, 1.5) == b"*4\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n5\r\n$3\r\n1.5\r\n"


async def test_commands_of_one_turn_share_a_write_and_keep_their_order(
    redis: aioredis.Redis, namespace: str
) -> None:
    conn = RespConnection(address_of(redis))
    try:
        key = f"{namespace}counter"
        replies = await asyncio.gather(*(conn.call("INCR", key) for _ in range(50)))
        assert replies == list(range(1, 51)), "each caller gets its own reply, in order"
        assert conn.writes == 1
        # A lone command goes out at once, in a write of its own.
        assert await conn.call("GET", key) == b"50"
        assert conn.writes == 2
    finally:
        await conn.close()


async def test_a_failing_command_fails_alone_with_redis_pys_error_class(
    redis: aioredis.Redis, namespace: str
) -> None:
    conn = RespConnection(address_of(redis))
    try:
        text, number = f"{namespace}text", f"{namespace}number"
        await redis.set(text, "not a number")
        good, bad, missing, after = await asyncio.gather(
            conn.call("INCR", number),
            conn.call("INCR", text),
            conn.call("EVALSHA", "0" * 40, 0),
            conn.call("INCR", number),
            return_exceptions=True,
        )
        assert (good, after) == (1, 2)
        assert isinstance(bad, ResponseError)
        assert isinstance(missing, NoScriptError), "the bus reloads its script on this class"
    finally:
        await conn.close()


async def test_nothing_listening_fails_the_waiting_commands_then_recovers(
    redis: aioredis.Redis,
) -> None:
    async with CuttableProxy("127.0.0.1", address_of(redis)["port"]) as proxy:
        proxy.cut()
        conn = RespConnection({"host": "127.0.0.1", "port": proxy.port})
        try:
            results = await asyncio.gather(
                *(conn.call("PING") for _ in range(3)), return_exceptions=True
            )
            assert all(isinstance(r, RedisConnectionError) for r in results), results
            proxy.heal()
            assert await conn.call("PING") == b"PONG", "the next command connects again"
        finally:
            await conn.close()


async def test_a_cut_fails_what_is_in_flight_and_the_next_command_reconnects(
    redis: aioredis.Redis, namespace: str
) -> None:
    async with CuttableProxy("127.0.0.1", address_of(redis)["port"]) as proxy:
        conn = RespConnection({"host": "127.0.0.1", "port": proxy.port})
        try:
            assert await conn.call("PING") == b"PONG"
            blocked = conn.submit("BLPOP", f"{namespace}never", 5)
            await asyncio.sleep(0.1)
            proxy.cut()
            with pytest.raises(RedisConnectionError):
                await blocked
            proxy.heal()
            assert await conn.call("PING") == b"PONG"
        finally:
            await conn.close()


async def test_a_frozen_link_is_dropped_after_the_reply_timeout(redis: aioredis.Redis) -> None:
    async with CuttableProxy("127.0.0.1", address_of(redis)["port"]) as proxy:
        conn = RespConnection({"host": "127.0.0.1", "port": proxy.port}, reply_timeout=0.5)
        try:
            assert await conn.call("PING") == b"PONG"
            proxy.freeze()
            first = conn.submit("PING")
            # New commands keep going out meanwhile (every 0.1 s for up to 3 s): they
            # must not hide the silence, so the first fails after about 0.5 s.
            later = []
            for _ in range(30):
                if first.done():
                    break
                await asyncio.sleep(0.1)
                later.append(conn.submit("PING"))
            assert first.done(), "a freeze hidden by the new commands"
            with pytest.raises(RedisConnectionError):
                await first
            await asyncio.gather(*later, return_exceptions=True)
            proxy.thaw()
            assert await conn.call("PING") == b"PONG"
        finally:
            await conn.close()


async def test_commands_past_the_bound_fail_at_once(redis: aioredis.Redis) -> None:
    async with CuttableProxy("127.0.0.1", address_of(redis)["port"]) as proxy:
        conn = RespConnection({"host": "127.0.0.1", "port": proxy.port}, max_in_flight=5)
        try:
            assert await conn.call("PING") == b"PONG"
            proxy.freeze()  # replies stop: commands pile up to the bound, then fail fast
            waiting = [conn.submit("PING") for _ in range(5)]
            with pytest.raises(RedisConnectionError, match="in flight"):
                await conn.call("PING")
            proxy.thaw()
            assert await asyncio.gather(*waiting) == [b"PONG"] * 5
        finally:
            await conn.close()
