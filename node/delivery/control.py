"""Commands to every node: one pub/sub channel that all nodes subscribe to.

A command is `op` + newline + payload: `disconnect\\n<user id>` closes that user's
local sockets with 1008; `broadcast\\n<frame>` writes the frame (already encoded,
the same bytes on every node) to every local socket; `replace\\n<connection
id>\\n<user id>` closes that connection (1008 `replaced`) on the node that holds it,
as its device has a newer one (node/presence.py). The channel has its own
connection (a second Subscriber), so user deliveries never pay for its routing.
Like all pub/sub it is at-most-once: a node whose connection is down at that
moment misses the command (the admin response says how many nodes received it).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from common.errors import SERVICE_DOWN
from common.protocol import CloseCode
from common.transport.keys import Keys
from common.transport.pubsub import ChannelSubscriber
from common.wsframe import text_frame
from node.delivery.hub import Hub
from node.delivery.subscriber import open_subscriber
from node.metrics import NodeMetrics
from node.presence import Holder
from node.state import NodeState

log = logging.getLogger("fanout.node")

DISCONNECT = b"disconnect"
BROADCAST = b"broadcast"
REPLACE = b"replace"
REPLACED = "replaced"


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
        elif op == REPLACE:
            conn_id, _, user_id = payload.decode(errors="replace").partition("\n")
            close_replaced(self._hub, user_id, conn_id)
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


def close_replaced(hub: Hub, user_id: str, conn_id: str) -> bool:
    """Close a local connection whose device has a newer one (1008 `replaced`);
    False if this node does not hold it."""
    user = hub.users.get(user_id)
    for conn in user.connections if user is not None else ():
        if conn.conn_id == conn_id:
            conn.close(CloseCode.POLICY, REPLACED)
            return True
    return False


async def replace(state: NodeState, user_id: str, holder: Holder) -> None:
    """Close the connection a newer one of its device replaces, wherever it is: here at
    once, on another node by a command (lost if that node's channel is down at the
    moment; its next device refresh finds the newer holder then, node/app.py)."""
    if holder.node_id == state.settings.node_id:
        close_replaced(state.hub, user_id, holder.conn_id)
        return
    payload = command(REPLACE, f"{holder.conn_id}\n{user_id}".encode())
    channel = state.keys.control_channel
    try:
        if state.settings.redis_cluster:
            await state.redis.spublish(channel, payload)
        else:
            await state.redis.publish(channel, payload)
    except SERVICE_DOWN as exc:
        log.warning("replaced connection %s not closed: redis unavailable (%r)", holder, exc)


@asynccontextmanager
async def listening_for_commands(state: NodeState) -> AsyncIterator[ControlChannel]:
    """Subscribe this node to the control channel for as long as the block runs."""
    control = ControlChannel(state.hub, state.metrics, state.keys)
    async with open_subscriber(state.settings, state.redis, control.on_message) as subscriber:
        await control.attach(subscriber)
        yield control
