"""Health, readiness and metrics of a node: the endpoints that need no token."""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from common.errors import SERVICE_DOWN
from node.http import schemas
from node.http.base import json_response
from node.http.routes import Route
from node.state import STATE


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    checks = {"redis": "ok", "postgres": "ok"}
    if state.draining:
        return json_response({"status": "draining", **checks}, status=503)
    results = await asyncio.gather(
        asyncio.wait_for(state.redis.ping(), 2),
        asyncio.wait_for(state.store.ping(), 2),
        return_exceptions=True,
    )
    for name, result in zip(("redis", "postgres"), results, strict=True):
        if isinstance(result, BaseException):
            checks[name] = f"down: {type(result).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return json_response(
        {"status": "ready" if ready else "unavailable", **checks}, status=200 if ready else 503
    )


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    # fanout_queue_depth is the cluster's, read from Redis (at most once a second);
    # with Redis down the scrape still answers, with the last depth read.
    with contextlib.suppress(*SERVICE_DOWN):
        await state.metrics.refresh_queue_depth(state.redis, state.keys, state.settings.partitions)
    return web.Response(
        body=generate_latest(state.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


_HEALTH = ("health",)
ROUTES = (
    Route(
        "GET", "/healthz", healthz, "Process alive", _HEALTH, auth="none", response=schemas.Alive
    ),
    Route(
        "GET",
        "/readyz",
        readyz,
        "Redis and Postgres reachable (503 while draining or when one is down)",
        _HEALTH,
        auth="none",
        response=schemas.Readiness,
        also=(503,),
    ),
    Route(
        "GET",
        "/metrics",
        metrics,
        "Prometheus metrics",
        _HEALTH,
        auth="none",
        media=(CONTENT_TYPE_LATEST,),
    ),
)
