"""The worker's own small HTTP server (`--port`): /healthz, /readyz, /metrics."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)

if TYPE_CHECKING:
    from worker.main import Worker

WORKER: web.AppKey[Worker] = web.AppKey("worker")


def health_app(worker: Worker) -> web.Application:
    app = web.Application()
    app[WORKER] = worker
    registry = CollectorRegistry()
    processed = Counter(
        "fanout_worker_processed_total", "Chat entries processed", registry=registry
    )
    owned = Gauge(
        "fanout_worker_partitions_owned", "Partitions this worker owns", registry=registry
    )
    seen = {"processed": 0}

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        checks = {"redis": "ok", "postgres": "ok"}
        results = await asyncio.gather(
            asyncio.wait_for(worker._redis.ping(), 2),
            asyncio.wait_for(worker.store.ping(), 2),
            return_exceptions=True,
        )
        for name, result in zip(("redis", "postgres"), results, strict=True):
            if isinstance(result, BaseException):
                checks[name] = f"down: {type(result).__name__}"
        ready = not worker.draining and all(v == "ok" for v in checks.values())
        status = "draining" if worker.draining else ("ready" if ready else "unavailable")
        return web.json_response({"status": status, **checks}, status=200 if ready else 503)

    async def metrics(request: web.Request) -> web.Response:
        processed.inc(worker.processor.processed - seen["processed"])
        seen["processed"] = worker.processor.processed
        owned.set(len(worker.leases.owned))
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
