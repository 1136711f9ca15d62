"""The node application: its resources as one cleanup context, its routes, its drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from aiohttp import web

from common.auth import TokenVerifier
from common.config import Settings
from common.errors import SERVICE_DOWN
from common.gcpause import freeze_startup_objects
from common.protocol import CloseCode
from common.runtime import raise_if_cancelled
from common.store.postgres import Store
from common.store.sessions import SessionDirectory
from common.transport.bus import Bus, connect_redis
from common.transport.connection import command_connection
from common.transport.keys import Keys
from common.transport.peer_rate import PeerLimiter
from common.transport.tombstones import LogEraser
from node.delivery.control import REPLACED, listening_for_commands
from node.delivery.hub import Hub
from node.delivery.subscriber import open_subscriber
from node.http import (
    admin,
    client,
    health,
    messages,
    openapi,
    participants,
    schemas,
    sessions,
    webhooks,
)
from node.http.base import api_errors
from node.http.cors import cors
from node.http.deadlines import BODY_TIMEOUT, body_deadline
from node.http.routes import Route, register
from node.metrics import NodeMetrics
from node.presence import DeviceRegistry
from node.state import STATE, NodeState
from node.stats import NodeStats
from node.ws.socket import depart_all
from node.ws.upgrade import websocket

log = logging.getLogger("fanout.node")

DRAIN_POLL = 0.05
PEER_CLOSE_GRACE = 1.0
# Seconds the cleanup waits for departing sockets' releases before Redis closes.
DEPART_WITHIN = 2.0
# Seconds the stop waits for Redis to drop this node run from presence; past it (Redis
# down or frozen) the run lapses by itself within FANOUT_LEASE_TTL.
RETIRE_WITHIN = 2.0


WEBSOCKET = (
    Route(
        "GET",
        "/ws",
        websocket,
        "Open the WebSocket (docs/protocol.md)",
        ("websocket",),
        status=101,
        query=schemas.WebSocketQuery,
        query_token=True,
        errors=(403, 429),
    ),
)
# Every route the node serves; openapi.table adds the document of them all.
TABLES = (
    sessions.ROUTES,
    participants.ROUTES,
    messages.ROUTES,
    admin.ROUTES,
    webhooks.ROUTES,
    health.ROUTES,
    client.ROUTES,
    WEBSOCKET,
)


def create_app(settings: Settings) -> web.Application:
    """A node app; its resources open on startup and close on cleanup."""
    settings.require_jwt()
    app = web.Application(
        middlewares=[cors, body_deadline, api_errors], client_max_size=1024 * 1024
    )
    app[BODY_TIMEOUT] = settings.http_body_timeout
    app.cleanup_ctx.append(_resources(settings))
    app.on_shutdown.append(_close_sockets)
    register(app, *TABLES, openapi.table(*TABLES))
    return app


def _resources(settings: Settings):  # type: ignore[no-untyped-def]
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        keys = Keys(settings.namespace)
        redis = await connect_redis(settings)
        try:
            async with (
                Store.open(
                    settings.database_url,
                    max_size=settings.db_pool_size,
                    webhooks=settings.webhook_url is not None,
                ) as store,
                command_connection(redis, cluster=settings.redis_cluster) as commands,
            ):
                bus = Bus(redis, settings, commands)
                hub = Hub(bus, keys, mode=settings.subscription_mode)
                metrics = NodeMetrics()
                hub.on_delivered = metrics.delivered
                hub.on_latency = metrics.delivery_latency.observe
                devices = DeviceRegistry(
                    redis,
                    keys,
                    node_id=settings.node_id,
                    lease_ttl=settings.lease_ttl,
                    max_devices=settings.max_devices,
                    cluster=settings.redis_cluster,
                    commands=commands,
                )
                state = NodeState(
                    settings=settings,
                    keys=keys,
                    verifier=TokenVerifier(settings),
                    redis=redis,
                    bus=bus,
                    store=store,
                    sessions=SessionDirectory(redis, store, keys, commands),
                    hub=hub,
                    devices=devices,
                    metrics=metrics,
                    eraser=LogEraser(redis, keys),
                    peers=PeerLimiter(
                        redis,
                        keys,
                        rate=settings.peer_rate,
                        burst=settings.peer_burst,
                        commands=commands,
                    ),
                    started_at=time.time(),
                )
                app[STATE] = state
                async with (
                    open_subscriber(
                        settings,
                        redis,
                        hub.on_message,
                        on_resubscribed=hub.repair_all,
                        probe=keys.node_probe(settings.node_id),
                    ) as subscriber,
                    listening_for_commands(state),
                    NodeStats(state),
                ):
                    hub.attach(subscriber)
                    if settings.subscription_mode == "pattern":
                        await subscriber.psubscribe(keys.user_channel_pattern.encode())
                    freeze_startup_objects()
                    keepers = [
                        asyncio.create_task(_announce_node(state), name="node-alive"),
                        asyncio.create_task(_refresh_devices(state), name="devices"),
                    ]
                    try:
                        yield
                    finally:
                        for keeper in keepers:
                            keeper.cancel()
                        await asyncio.gather(*keepers, return_exceptions=True)
                        await depart_all(state, DEPART_WITHIN)
                        with contextlib.suppress(*SERVICE_DOWN):
                            async with asyncio.timeout(RETIRE_WITHIN):
                                await devices.retire()
                        await state.eraser.close()
                        await hub.close()
        finally:
            await redis.aclose()

    return ctx


async def _announce_node(state: NodeState) -> None:
    """Keep this node run alive in Redis every third of the lease: the devices it holds
    are online while it is (node/presence.py), and lapse within the lease once it dies."""
    interval = state.settings.lease_ttl / 3
    while True:
        try:
            await state.devices.announce()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("node liveness renewal failed: %s", exc)
        await asyncio.sleep(interval)


async def _refresh_devices(state: NodeState) -> None:
    """Renew the devices' own leases (the backstop behind the node's liveness) and close
    held connections whose device another connection holds now (a lost `replace`).

    A round renews every device, its chunk at its place in the round (node/presence.py);
    a round starts every half of the device lease and is spread over the first half of
    that, so two renewals of a device are at most three quarters of its lease apart
    wherever it moves in the list.
    """
    interval = state.devices.device_lease / 2
    loop = asyncio.get_running_loop()
    while True:
        started = loop.time()
        held = list(state.hub.connections())
        try:
            for conn in await state.devices.refresh(held, spread=interval / 2):
                conn.close(CloseCode.POLICY, REPLACED)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("device lease refresh failed: %s", exc)
        raise_if_cancelled()
        await asyncio.sleep(max(0.0, started + interval - loop.time()))


async def _close_sockets(app: web.Application) -> None:
    """Shutdown: every client is told 1001 so it reconnects to another node."""
    state = app[STATE]
    state.draining = True
    conns = list(state.hub.connections())
    for conn in conns:
        conn.close(CloseCode.GOING_AWAY, "node shutting down")
    await asyncio.sleep(0)


async def drain(app: web.Application, within: float) -> None:
    """SIGTERM: report not ready, move every client off (1001) and wait for them to go.

    It runs while the node still listens, so /readyz answers 503 during the drain and
    a load balancer takes the node out; the stats show it as draining meanwhile.
    """
    state = app[STATE]
    await _close_sockets(app)
    # Polled: a socket leaves the hub by callback, there is no event to await. A peer
    # answers a close in milliseconds; one that has not within PEER_CLOSE_GRACE is not
    # reading now, and waiting longer keeps the node from stopping: the cleanup ends
    # it (its 1001 was written, the end of the stream follows; node.ws.socket.depart_all).
    for _ in range(int(min(within, PEER_CLOSE_GRACE) / DRAIN_POLL)):
        if next(state.hub.connections(), None) is None:
            return
        await asyncio.sleep(DRAIN_POLL)
