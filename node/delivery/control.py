"""Admin commands to every node: one pub/sub channel that all nodes subscribe to.

A command is `op` + newline + payload: `disconnect\\n<user id>` closes that user's
local sockets with 1008; `broadcast\\n<frame>` writes the frame (already encoded,
the same bytes on every node) to every local socket. The channel has its own
connection (a second Subscriber), so user deliveries never pay for its routing.
Like all pub/sub it is at-most-once: a node whose connection is down at that
moment misses the command (the admin response says how many nodes received it).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from common.protocol import CloseCode
from common.transport.keys import Keys
from common.transport.pubsub import ChannelSubscriber
from common.wsframe import text_frame
from node.delivery.hub import Hub
from node.delivery.subscriber import open_subscriber
from node.metrics import NodeMetrics
from node.state import NodeState

log = logging.getLogger("fanout.node")

DISCONNECT = b"disconnect"
BROADCAST = b"broadcast"


def command(op: bytes, payload: bytes) -> bytes:
    """A control message as published on the channel."""
    return op + b"\n" + payload


class ControlChannel:
    """Carries out admin commands on this node's connections."""

    def __init__(self, hub: Hub, metrics: NodeMetrics, keys: Keys) -> None:
        self._hub = hub
        self._metrics = metrics
        self.channel = keys.control_channel.encode()

    async def attach(self, subscriber: ChannelSubscriber) -> None:
        """Subscribe to the control channel; returns once it is live."""
        await subscriber.subscribe([self.channel])

    def on_message(self, channel: bytes, data: bytes) -> None:
        """Subscriber callback (runs in the read callback: never blocks)."""
        if channel != self.channel:
            return
        op, _, payload = data.partition(b"\n")
        if op == DISCONNECT:
            self.disconnect(payload.decode(errors="replace"))
        elif op == BROADCAST:
            self.broadcast(payload)
        else:
            log.warning("unknown control command %r", op[:32])

    def disconnect(self, user_id: str) -> int:
        """Close every local socket of a user with 1008; how many were closed."""
        user = self._hub.users.get(user_id)
        conns = list(user.connections) if user is not None else []
        for conn in conns:
            conn.close(CloseCode.POLICY, "disconnected by an admin")
        if conns:
            log.info("admin disconnect: closed %d connection(s) of %s", len(conns), user_id)
        return len(conns)

    def broadcast(self, frame: bytes) -> int:
        """Write a frame to every local socket; how many got it.

        Synchronous on purpose: queueing a frame is a deque append, so even tens of
        thousands of sockets take milliseconds, and the frame goes out in one pass.
        """
        sent = 0
        framed = text_frame(frame)  # once, for every socket
        for conn in self._hub.connections():
            conn.send_framed(framed)
            sent += 1
        self._metrics.frames_broadcast += sent
        return sent


@asynccontextmanager
async def listening_for_commands(state: NodeState) -> AsyncIterator[ControlChannel]:
    """Subscribe this node to the control channel for as long as the block runs."""
    control = ControlChannel(state.hub, state.metrics, state.keys)
    async with open_subscriber(state.settings, state.redis, control.on_message) as subscriber:
        await control.attach(subscriber)
        yield control
