"""What a node's request handlers share, typed, under one app key."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from aiohttp import web

from common.auth import TokenVerifier
from common.config import Settings
from common.store.postgres import Store
from common.store.sessions import SessionDirectory
from common.transport.bus import Bus
from common.transport.keys import Keys
from common.transport.peer_rate import PeerLimiter
from common.transport.tombstones import LogEraser
from node.delivery.hub import Hub
from node.metrics import NodeMetrics
from node.presence import DeviceRegistry
from node.ws.connection import ConnectionHooks


@dataclass(slots=True)
class NodeState:
    settings: Settings
    keys: Keys
    verifier: TokenVerifier
    redis: aioredis.Redis
    bus: Bus
    store: Store
    sessions: SessionDirectory
    hub: Hub
    devices: DeviceRegistry
    metrics: NodeMetrics
    # Deleted sessions' messages leave the delivery logs (SPEC §6); owned, closed at cleanup.
    eraser: LogEraser
    # What one sender may push into another user's delivery log (FANOUT_PEER_RATE/BURST).
    peers: PeerLimiter
    draining: bool = False
    started_at: float = field(default=0.0)
    # Shared by every connection (bound methods made once, not per socket).
    connection_hooks: ConnectionHooks = field(init=False)
    # Sockets that went away and are being released (node.ws.upgrade): the app's cleanup waits.
    departing: set[asyncio.Task[None]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.connection_hooks = ConnectionHooks(
            on_slow_close=self.metrics.slow_consumer_closes.inc,
            on_drop=self.metrics.dropped.inc,
            on_unsent=self.metrics.unsent.inc,
            on_written=self.metrics.send_wait.observe,
        )


STATE: web.AppKey[NodeState] = web.AppKey("fanout_state", NodeState)
