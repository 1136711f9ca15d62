"""`fanout node`: serve one node until SIGTERM, then drain (SPEC §7)."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import sys

from aiohttp import web

from common.config import Settings
from common.logs import setup_logging
from common.runtime import run, stop_event
from node.app import create_app, drain
from node.http.deadlines import runner_options

log = logging.getLogger("fanout.node")

# Seconds past FANOUT_DRAIN_TIMEOUT before a stuck stop is cut short (exit status 1).
STUCK_GRACE = 10.0


async def serve(settings: Settings, host: str, port: int) -> None:
    app = create_app(settings)
    # The whole stop fits in FANOUT_DRAIN_TIMEOUT: the drain gets most of it, the
    # runner's own wait for stuck handlers the rest.
    cleanup_budget = min(2.0, settings.drain_timeout / 4)
    runner = web.AppRunner(
        app, shutdown_timeout=cleanup_budget, access_log=None, **runner_options(settings)
    )
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
        _arm_watchdog(settings.drain_timeout + STUCK_GRACE)
        log.info("draining: closing sockets with 1001")
        await drain(
            app, settings.drain_timeout - cleanup_budget
        )  # still listening: /readyz says 503 until the sockets are gone
    finally:
        # Stops listening, runs on_shutdown (1001 to any socket left), waits for handlers
        # up to the cleanup budget, then closes Redis and Postgres.
        await runner.cleanup()
    log.info("node %s stopped", settings.node_id)


def _arm_watchdog(after: float) -> None:
    """A stop that outlives its budget is a bug: say where every task is, then exit."""

    def give_up() -> None:
        log.error("shutdown still running after %.0f s; tasks left:", after)
        for task in asyncio.all_tasks():
            task.print_stack(file=sys.stderr)
        os._exit(1)

    asyncio.get_running_loop().call_later(after, give_up)


def raise_fd_limit() -> int:
    """Every socket is a file descriptor: take the soft limit up to the hard one; the result."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit still has the kernel's nr_open ceiling (2**20 by default).
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 2**20)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("open files limit stays at %d (%s)", soft, exc)
            return soft
    return max(soft, target)


def main(settings: Settings, host: str, port: int) -> None:
    setup_logging(settings.log_format)
    log.info("open files limit: %d", raise_fd_limit())
    run(serve(settings, host, port))
