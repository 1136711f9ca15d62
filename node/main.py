"""`fanout node`: serve one node until SIGTERM, then drain (SPEC §7)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import sys

from aiohttp import web

from common.config import Settings
from common.errors import SERVICE_DOWN
from common.logs import setup_logging
from common.probes import Checks
from common.runtime import run, stop_event
from node.app import create_app, drain
from node.http.deadlines import runner_options
from node.startup import listening_socket, stand_in, wait_for_services

log = logging.getLogger("fanout.node")

# Seconds past FANOUT_DRAIN_TIMEOUT before a stuck stop is cut short (exit status 1).
STUCK_GRACE = 10.0


async def serve(settings: Settings, host: str, port: int) -> None:
    sock = listening_socket(host, port, reuse_port=settings.reuse_port)
    stop = stop_event()
    try:
        checks: Checks = {"redis": "not tried yet", "postgres": "not tried yet"}
        log.info("node %s listening on %s:%d", settings.node_id, host, port)
        async with stand_in(sock, checks):
            runner = await _start_app(settings, checks, stop)
        if runner is None:
            log.info("node %s stopped before Redis and Postgres answered", settings.node_id)
            return
        await web.SockSite(runner, sock).start()
        log.info("node %s serving (%s mode)", settings.node_id, settings.subscription_mode)
        await _serve_until_stopped(settings, runner, stop)
    finally:
        sock.close()
    log.info("node %s stopped", settings.node_id)


async def _start_app(
    settings: Settings, checks: Checks, stop: asyncio.Event
) -> web.AppRunner | None:
    """The node's app, set up once Redis and Postgres answer; None if stopped first."""
    while await wait_for_services(settings, checks, stop):
        # The whole stop fits in FANOUT_DRAIN_TIMEOUT: the drain gets most of it, the
        # runner's own wait for stuck handlers the rest.
        runner = web.AppRunner(
            create_app(settings),
            shutdown_timeout=_cleanup_budget(settings),
            access_log=None,
            **runner_options(settings),
        )
        try:
            await runner.setup()
        except SERVICE_DOWN as exc:
            # It answered the probe and went away again before the app opened it.
            log.warning("start interrupted (%s: %s); waiting again", type(exc).__name__, exc)
            with contextlib.suppress(Exception):
                await runner.cleanup()
            continue
        return runner
    return None


def _cleanup_budget(settings: Settings) -> float:
    return min(2.0, settings.drain_timeout / 4)


async def _serve_until_stopped(
    settings: Settings, runner: web.AppRunner, stop: asyncio.Event
) -> None:
    try:
        await stop.wait()
        _arm_watchdog(settings.drain_timeout + STUCK_GRACE)
        log.info("draining: closing sockets with 1001")
        await drain(
            runner.app, settings.drain_timeout - _cleanup_budget(settings)
        )  # still listening: /readyz says 503 until the sockets are gone
    finally:
        # Stops listening, runs on_shutdown (1001 to any socket left), waits for handlers
        # up to the cleanup budget, then closes Redis and Postgres.
        await runner.cleanup()


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
