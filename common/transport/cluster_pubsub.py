"""Sharded pub/sub on Redis Cluster: one Subscriber per primary, channels routed by slot.

redis-py's asyncio cluster client has no sharded-pub/sub subscriber, so this is the
smallest correct thing on its primitives: the slot map of `RedisCluster` says which
primary serves a channel's slot (`channel:user:{id}` hashes on the user id), and a
plain `Subscriber` in sharded mode (SSUBSCRIBE) holds that primary's channels. Each
primary gets a loop-back probe channel whose hash tag lands on one of its slots.

Limit: the slot map is read at start; a resharding while the node runs is not
followed (restart the nodes after moving slots).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot

from common.transport.pubsub import MessageHandler, Subscriber


def probe_channel_for(cluster: RedisCluster, node: ClusterNode, prefix: str) -> bytes:
    """A channel name whose slot is served by `node`."""
    for n in range(100_000):
        channel = f"{prefix}{{probe-{n}}}".encode()
        owner = cluster.nodes_manager.get_node_from_slot(key_slot(channel))
        if owner.name == node.name:
            return channel
    raise RuntimeError(f"no probe channel found for {node.name}")


class ShardedSubscriber:
    """The same interface as `Subscriber`, spread over the cluster's primaries."""

    def __init__(
        self,
        url: str,
        cluster: RedisCluster,
        on_message: MessageHandler,
        *,
        on_resubscribed: Callable[[], None] | None = None,
        ping_interval: float = 5.0,
        probe_prefix: str | None = None,
        publish: Callable[[bytes, bytes], Awaitable[Any]] | None = None,
    ) -> None:
        self._cluster = cluster
        self._url = url
        self._on_message = on_message
        self._on_resubscribed = on_resubscribed
        self._ping_interval = ping_interval
        self._probe_prefix = probe_prefix
        self._publish = publish
        self._shards: dict[str, Subscriber] = {}
        self._stack = contextlib.AsyncExitStack()

    def _node_url(self, node: ClusterNode) -> str:
        parts = urlsplit(self._url)
        auth = parts.netloc.rpartition("@")[0]
        netloc = f"{auth}@{node.host}:{node.port}" if auth else f"{node.host}:{node.port}"
        return urlunsplit(parts._replace(netloc=netloc))

    async def __aenter__(self) -> ShardedSubscriber:
        await self._cluster.initialize()
        try:
            for node in self._cluster.get_primaries():
                probe = None
                if self._probe_prefix is not None and self._publish is not None:
                    probe = (
                        probe_channel_for(self._cluster, node, self._probe_prefix),
                        self._publish,
                    )
                shard = Subscriber(
                    self._node_url(node),
                    self._on_message,
                    on_resubscribed=self._on_resubscribed,
                    ping_interval=self._ping_interval,
                    sharded=True,
                    probe=probe,
                )
                self._shards[node.name] = await self._stack.enter_async_context(shard)
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    @property
    def connected(self) -> bool:
        return all(shard.connected for shard in self._shards.values())

    @property
    def reconnects(self) -> int:
        return sum(shard.reconnects for shard in self._shards.values())

    def _by_shard(self, channels: Iterable[bytes]) -> dict[str, list[bytes]]:
        grouped: dict[str, list[bytes]] = defaultdict(list)
        for channel in channels:
            node = self._cluster.nodes_manager.get_node_from_slot(key_slot(channel))
            grouped[node.name].append(channel)
        return grouped

    async def subscribe(self, channels: Iterable[bytes]) -> None:
        """Subscribe each channel on the primary that serves its slot; returns once live."""
        grouped = self._by_shard(channels)
        await asyncio.gather(*(self._shards[name].subscribe(chs) for name, chs in grouped.items()))

    def unsubscribe(self, channels: Iterable[bytes]) -> None:
        for name, chs in self._by_shard(channels).items():
            self._shards[name].unsubscribe(chs)

    async def psubscribe(self, pattern: bytes) -> None:
        raise RuntimeError("pattern subscriptions do not exist for sharded pub/sub")
