"""A node's start: its listening socket, and waiting (while listening) for Redis and Postgres.

SPEC §3: a node whose Redis or Postgres does not answer at start still listens,
`/healthz` is 200, `/readyz` is 503 naming what is down, and it logs one line per retry
until the services answer. Until then a small stand-in app answers on the node's
socket; the real app takes the same socket over, so no connection is refused at the
switch (both accept from one kernel queue while they overlap).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import AsyncIterator

from aiohttp import web

from common.config import Settings
from common.errors import StartError
from common.probes import Checks, all_ok, check_services

log = logging.getLogger("fanout.node")

# Seconds between two tries of a service that does not answer (one log line each).
RETRY_INTERVAL = 2.0


def listening_socket(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    """A bound, listening TCP socket; a port in use is a StartError unless reuse_port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise StartError(
                f"port {port} on {host} is in use (another node? set FANOUT_REUSE_PORT=1 "
                "to share it on purpose)"
            ) from None
        raise StartError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


async def wait_for_services(settings: Settings, checks: Checks, stop: asyncio.Event) -> bool:
    """Try until Redis and Postgres answer (True) or stop is set (False); `checks` is updated."""
    while not stop.is_set():
        checks.update(await check_services(settings))
        if all_ok(checks):
            return True
        down = "; ".join(f"{name} {value}" for name, value in checks.items() if value != "ok")
        log.warning("waiting for %s; retrying in %.0f s", down, RETRY_INTERVAL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), RETRY_INTERVAL)
    return False


@contextlib.asynccontextmanager
async def stand_in(sock: socket.socket, checks: Checks) -> AsyncIterator[None]:
    """Serve /healthz (200), /readyz (503, what is down) and 503 elsewhere on `sock`."""

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        return web.json_response({"status": "starting", **checks}, status=503)

    async def unavailable(request: web.Request) -> web.Response:
        message = "node starting: waiting for Redis/Postgres; retry"
        return web.json_response({"error": {"code": "UNAVAILABLE", "message": message}}, status=503)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_route("*", "/{tail:.*}", unavailable)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    # A duplicate descriptor: stopping the stand-in closes its copy, not the node's socket.
    await web.SockSite(runner, sock.dup()).start()
    try:
        yield
    finally:
        await runner.cleanup()
