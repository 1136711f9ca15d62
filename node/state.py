"""What a node's request handlers share, typed, under one app key."""

from __future__ import annotations

from dataclasses import dataclass, field

import redis.asyncio as aioredis
from aiohttp import web

from common.auth import TokenVerifier
from common.bus import Bus
from common.config import Settings
from common.keys import Keys
from common.sessions import SessionDirectory
from common.store import Store
from node.hub import Hub
from node.metrics import NodeMetrics
from node.presence import DeviceRegistry


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
    draining: bool = False
    started_at: float = field(default=0.0)


STATE: web.AppKey[NodeState] = web.AppKey("fanout_state", NodeState)
