"""BASELINE, not fanout: a minimal aiohttp + redis-py forwarder that scripts/bench.py compares.

SUBSCRIBE per user on connect, `send_frame` of each published payload to the user's
local sockets, verbatim but for the publish-time stamp that fanout's delivery script
puts in front of each frame (`@<µs>\n`, common/protocol.py: the nodes strip it too). It
speaks just enough of the protocol for `fanout loadtest --mode fanout` (GET
/ws?device_id=&token= or a Bearer header, a `welcome`, frames as published) and none of
the rest: no seq check, no resume, no bounded queues, no metrics.

    FANOUT_JWT_SECRET=... .venv/bin/python scripts/baseline_forwarder.py --port 8090
"""

import argparse
import asyncio
import os
from collections.abc import AsyncIterator

import jwt
import orjson
import redis.asyncio as aioredis
import uvloop
from aiohttp import WSMsgType, web

NS = os.environ.get("FANOUT_NAMESPACE", "")
SECRET = os.environ["FANOUT_JWT_SECRET"]
SOCKETS = web.AppKey("sockets", dict[bytes, set[web.WebSocketResponse]])
PUBSUB = web.AppKey("pubsub", aioredis.client.PubSub)


async def websocket(request: web.Request) -> web.StreamResponse:
    token = request.query.get("token") or request.headers.get("Authorization", "")[7:]
    try:
        user = jwt.decode(token, SECRET, algorithms=["HS256"])["sub"]
    except jwt.PyJWTError:
        return web.Response(status=401)
    channel, sockets = f"{NS}channel:user:{{{user}}}".encode(), request.app[SOCKETS]
    ws = web.WebSocketResponse(compress=False)
    await ws.prepare(request)
    if channel not in sockets:
        sockets[channel] = set()
        await request.app[PUBSUB].subscribe(channel)
    sockets[channel].add(ws)
    welcome = {"type": "welcome", "node_id": "baseline", "user_id": user, "last_seq": 0}
    welcome["device_id"] = request.query.get("device_id")
    await ws.send_frame(orjson.dumps(welcome), WSMsgType.TEXT)
    try:
        async for _ in ws:
            pass
    finally:
        sockets[channel].discard(ws)
        if not sockets[channel]:
            del sockets[channel]
            await request.app[PUBSUB].unsubscribe(channel)
    return ws


async def forward(app: web.Application) -> None:
    async for message in app[PUBSUB].listen():
        if message["type"] == "message":
            data = message["data"]
            if data[:1] == b"@":
                data = data.partition(b"\n")[2]
            for ws in list(app[SOCKETS].get(message["channel"], ())):
                await ws.send_frame(data, WSMsgType.TEXT)


async def lifecycle(app: web.Application) -> AsyncIterator[None]:
    redis = aioredis.Redis.from_url(os.environ.get("FANOUT_REDIS_URL", "redis://127.0.0.1:6379"))
    app[SOCKETS], app[PUBSUB] = {}, redis.pubsub()
    await app[PUBSUB].subscribe(f"{NS}baseline:keepalive")  # listen() ends with no channel
    task = asyncio.create_task(forward(app))
    yield
    task.cancel()
    await redis.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="baseline forwarder (not fanout)")
    parser.add_argument("--port", type=int, default=8090)
    app = web.Application()
    app.router.add_get("/ws", websocket)
    app.cleanup_ctx.append(lifecycle)
    web.run_app(app, host="127.0.0.1", port=parser.parse_args().port, loop=uvloop.new_event_loop())
