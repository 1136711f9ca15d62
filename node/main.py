"""`fanout node`: serve one node until SIGTERM, then drain (SPEC §7)."""

from __future__ import annotations

import logging

from aiohttp import web

from common.config import Settings
from common.runtime import run, setup_logging, stop_event
from node.app import create_app, drain

log = logging.getLogger("fanout.node")


async def serve(settings: Settings, host: str, port: int) -> None:
    app = create_app(settings)
    runner = web.AppRunner(app, shutdown_timeout=settings.drain_timeout, access_log=None)
    await runner.setup()
    stop = stop_event()
    site = web.TCPSite(runner, host, port, reuse_port=True)
    await site.start()
    log.info(
        "node %s listening on %s:%d (%s mode)",
        settings.node_id,
        host,
        port,
        settings.subscription_mode,
    )
    try:
        await stop.wait()
        log.info("draining: closing sockets with 1001")
        await drain(app)  # still listening: /readyz says 503 until the sockets are gone
    finally:
        # Stops listening, runs on_shutdown (1001 to every socket), waits for handlers
        # up to the drain timeout, then closes Redis and Postgres.
        await runner.cleanup()
    log.info("node %s stopped", settings.node_id)


def main(settings: Settings, host: str, port: int) -> None:
    setup_logging()
    run(serve(settings, host, port))
