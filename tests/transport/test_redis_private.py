"""What common/transport/redis_private.py relies on in redis-py (pinned), as behaviour.

Against the real Redis: a command that fails on the lean connection raises exactly
what redis-py raises for it (class and message), through hiredis's `ReplyError` text
and redis-py's `parse_error`; and a URL means the same connection to both.
"""

from __future__ import annotations

from typing import Any

import hiredis
import pytest
import redis.asyncio as aioredis
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)
from redis.exceptions import (
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
)

from common.transport.connection import RespConnection, address_of
from common.transport.redis_private import error_from_reply, url_settings


async def test_a_failing_command_raises_what_redis_py_raises(
    redis: aioredis.Redis, namespace: str
) -> None:
    text = f"{namespace}text"
    await redis.set(text, "not a number")
    failing: list[tuple[Any, ...]] = [
        ("INCR", text),  # ERR value is not an integer
        ("LPUSH", text, "x"),  # WRONGTYPE
        ("EVALSHA", "0" * 40, 0),  # NOSCRIPT
        ("EXEC",),  # ERR EXEC without MULTI
        ("NO-SUCH-COMMAND",),  # ERR unknown command
    ]
    conn = RespConnection(address_of(redis))
    try:
        for command in failing:
            with pytest.raises(ResponseError) as theirs:
                await redis.execute_command(*command)  # type: ignore[no-untyped-call]
            with pytest.raises(ResponseError) as ours:
                await conn.call(*command)
            assert type(ours.value) is type(theirs.value), command
            assert str(ours.value) == str(theirs.value), command
        assert await conn.call("GET", text) == b"not a number"  # the connection goes on
    finally:
        await conn.close()


def test_hiredis_hands_an_error_reply_over_as_its_text_code_first() -> None:
    reader = hiredis.Reader()
    reader.feed(b"-NOSCRIPT No matching script.\r\n+OK\r\n")
    reply = reader.gets()
    assert isinstance(reply, hiredis.ReplyError)
    assert str(reply) == "NOSCRIPT No matching script."
    assert reader.gets() == b"OK"
    assert reader.gets() is False  # nothing more yet: the connection waits for bytes


@pytest.mark.parametrize(
    ("text", "kind", "message"),
    [
        ("NOSCRIPT No matching script.", NoScriptError, "No matching script."),
        ("READONLY You can't write.", ReadOnlyError, "You can't write."),
        ("OOM command not allowed", OutOfMemoryError, "command not allowed"),
        ("ERR max number of clients reached", RedisConnectionError, None),
        # A code redis-py has no class for stays in the message.
        ("WRONGTYPE Operation against a key", ResponseError, "WRONGTYPE Operation against a key"),
        ("SOMETHINGNEW from a later Redis", ResponseError, "SOMETHINGNEW from a later Redis"),
    ],
)
def test_an_error_reply_maps_to_redis_pys_class(
    text: str, kind: type[Exception], message: str | None
) -> None:
    error = error_from_reply(text)
    assert type(error) is kind
    if message is not None:
        assert str(error) == message


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://:secret@cache:6380/3",
        "rediss://ops:pw@cache:6380/2",
        "unix:///run/redis.sock?db=1",
    ],
)
def test_a_url_means_the_connection_redis_py_makes_of_it(url: str) -> None:
    ours = url_settings(url)
    assert ours == address_of(aioredis.Redis.from_url(url))
    assert ours["tls"] is url.startswith("rediss://")
