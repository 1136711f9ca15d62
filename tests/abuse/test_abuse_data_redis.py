"""The Redis scripts behind the data limits, against the real Redis: the peer buckets
(all or nothing, refill) and the log rewrite of a deleted session."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from common.config import Settings
from common.transport.bus import Bus
from common.transport.keys import Keys
from common.transport.peer_rate import PeerLimiter
from common.transport.tombstones import LogEraser

DOOMED = "00000000-0000-4000-8000-00000000000d"
KEPT = "00000000-0000-4000-8000-00000000000c"


async def test_peer_buckets_take_all_or_nothing_and_refill(
    redis: aioredis.Redis, namespace: str
) -> None:
    limiter = PeerLimiter(redis, Keys(namespace), rate=20.0, burst=2)
    assert await limiter.refused("s", ["a", "s"]) is None  # the sender is not its own peer
    assert await limiter.refused("s", ["a"]) is None  # a: 0 left, b: full
    # a is empty: refused, and b's bucket is not touched.
    assert await limiter.refused("s", ["b", "a"]) == "a"
    assert await limiter.refused("s", ["b"]) is None
    assert await limiter.refused("s", ["b"]) is None
    assert await limiter.refused("s", ["b"]) == "b"
    # Another sender has buckets of its own.
    assert await limiter.refused("t", ["a", "b"]) is None
    await asyncio.sleep(0.12)  # 20/s: two tokens back
    assert await limiter.refused("s", ["a", "b"]) is None
    ttl = await redis.ttl(Keys(namespace).peer_buckets("s"))
    assert 0 < ttl <= 2  # gone once every bucket would be full again


async def test_the_log_rewrite_replaces_only_the_sessions_messages(
    redis: aioredis.Redis, namespace: str, settings: Settings
) -> None:
    bus = Bus(redis, settings)
    keys = Keys(namespace)

    def message(session_id: str, text: str) -> bytes:
        return (
            b'"type":"message","session_id":"' + session_id.encode() + b'","message":'
            b'{"content":"'
            + text.encode()
            + b'","metadata":{"session_id":"'
            + DOOMED.encode()
            + b'"}}}'
        )

    for session_id, text in [(DOOMED, "one"), (KEPT, "two"), (DOOMED, "three"), (KEPT, "four")]:
        await bus.deliver(["u"], message(session_id, text))
    session_frame = b'"type":"session","session_id":"' + DOOMED.encode() + b'","status":"running"}'
    await bus.deliver(["u"], session_frame)
    ttl = await redis.ttl(keys.log("u"))

    eraser = LogEraser(redis, keys)
    assert await eraser.erase(["u", "nobody"], DOOMED) == 2
    frames = await bus.log_after("u", 0)
    assert [f[: f.index(b",")] for f in frames] == [b'{"seq":%d' % n for n in range(1, 6)]
    assert b"one" not in b"".join(frames) and b"three" not in b"".join(frames)
    assert frames[0] == b'{"seq":1,"type":"session","session_id":"%s","status":"deleted"}' % (
        DOOMED.encode()
    )
    assert b"two" in frames[1] and b"four" in frames[3]  # another session's, even if its
    assert frames[4].endswith(b'"status":"running"}')  # metadata names the doomed one
    assert 0 < await redis.ttl(keys.log("u")) <= ttl
    # Nothing left to replace: the log is not rebuilt; and delivery goes on after it.
    assert await eraser.erase(["u"], DOOMED) == 0
    assert (await bus.deliver(["u"], message(KEPT, "five")))["u"] == 6
    await eraser.close()
