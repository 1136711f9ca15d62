"""A node's stats writer: its numbers, its connection list and (as historian) the history.

Every FANOUT_STATS_INTERVAL the node writes its stats entry (common/transport/stats.py) and
the changes to its connection hash (connection id -> user, device, since; read by
/admin/connections). Both expire after FANOUT_LEASE_TTL unless refreshed, so a
dead node vanishes from the cluster view. The node that holds the historian lease
also appends the cluster totals to the history stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson

from common.transport.cluster_stats import (
    append_history,
    distinct_users,
    history_point,
    quantile,
    read_processes,
    summarize,
)
from common.transport.lease import Leases
from common.transport.queues import queue_depths
from common.transport.stats import NODE, WORKER, Rates, StatsWriter, stats_writes
from node.metrics import NodeMetrics
from node.state import NodeState

log = logging.getLogger("fanout.node")

# The connection hash is compared with the hub at most this often: the comparison
# walks every local connection, so it is not done more than once a second.
CONNECTIONS_SYNC_EVERY = 1.0
# Fields per HSET/HDEL command when a node (re)writes a large connection hash.
HASH_CHUNK = 1000


def counter_value(metric: Any) -> float:
    """The value of an unlabelled prometheus-client Counter (its `_total` sample)."""
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                return float(sample.value)
    return 0.0


class NodeStats(StatsWriter):
    """The node's stats (and, while it holds the historian lease, the cluster history)."""

    def __init__(self, state: NodeState) -> None:
        settings = state.settings
        super().__init__(
            NODE,
            settings.node_id,
            settings.stats_interval,
            state.started_at or time.time(),
            state.redis,
            state.keys,
        )
        self._state = state
        self._rates = Rates()
        self._latency_seen = list(state.metrics.delivery_latency.counts)
        self._written: set[str] = set()
        self._users_written: frozenset[str] | None = None
        self._synced = False
        self._synced_at = 0.0
        # hub.changes as of the last connection-hash and user-set writes: while it stays
        # the same, neither changed, and the walks over every connection are skipped.
        self._synced_changes = -1
        self._users_changes = -1
        self._leases = Leases(state.redis, settings.node_id, settings.lease_ttl)

    async def on_stop(self) -> None:
        state = self._state
        await state.redis.delete(state.keys.stats_users(state.settings.node_id))
        await self._leases.release(state.keys.stats_historian)

    async def tick(self) -> None:
        """One stats write (and, as historian, one history point)."""
        state = self._state
        settings = state.settings
        await self._measure_clock_offset()
        record = {**await self._sampler.sample(state.redis), **self._numbers()}
        self._export(state.metrics, record)
        index_ttl = max(settings.lease_ttl * 3, 60)
        changes = state.hub.changes
        async with state.redis.pipeline(transaction=False) as pipe:
            stats_writes(pipe, state.keys, record, settings.lease_ttl, index_ttl)
            synced = self._sync_connections(pipe, changes)
            users = self._write_users(pipe, changes)
            try:
                await pipe.execute()
            except BaseException:
                self._synced = False  # unknown what landed: rewrite the hash next time
                self._users_written = None
                raise
            self._users_written, self._users_changes = users, changes
        if synced is not None:
            self._written, self._synced, self._synced_changes = synced, True, changes
        await self._historian()

    async def _measure_clock_offset(self) -> None:
        """Redis' clock minus ours: deliveries are stamped with Redis TIME (node/delivery/hub)."""
        before = time.time()
        seconds, micros = await self._state.redis.time()
        after = time.time()
        self._state.hub.clock_offset = seconds + micros / 1_000_000 - (before + after) / 2

    def _numbers(self) -> dict[str, Any]:
        state = self._state
        m = state.metrics
        hub = state.hub
        totals = {
            "messages_in": float(sum(m.frames_in.values())),
            "messages_out": float(m.frames_out),
            "deliveries": float(m.deliveries),
        }
        rates = self._rates.per_second(totals)
        counts = list(m.delivery_latency.counts)
        window = [now - seen for now, seen in zip(counts, self._latency_seen, strict=True)]
        self._latency_seen = counts
        p99 = quantile(m.delivery_latency.bounds, window, 0.99)
        return {
            "draining": state.draining,
            "subscription_mode": state.settings.subscription_mode,
            "connections": hub.connection_count,
            "users": len(hub.users),
            "connections_total": int(counter_value(m.connections_total)),
            "messages_in_per_s": rates["messages_in"],
            "messages_out_per_s": rates["messages_out"],
            "deliveries_per_s": rates["deliveries"],
            "messages_in_total": int(totals["messages_in"]),
            "messages_out_total": int(totals["messages_out"]),
            "deliveries_total": int(totals["deliveries"]),
            "drops_total": int(counter_value(m.dropped)),
            "unsent_total": int(counter_value(m.unsent)),
            "clock_offset_ms": round(hub.clock_offset * 1000, 3),
            "slow_consumer_closes_total": int(counter_value(m.slow_consumer_closes)),
            "latency_p99_ms": None if p99 is None else round(p99 * 1000, 3),
            "latency_bounds": list(m.delivery_latency.bounds),
            "latency_counts": window,
        }

    @staticmethod
    def _export(metrics: NodeMetrics, record: dict[str, Any]) -> None:
        metrics.users_active.set(record["users"])
        metrics.redis_roundtrip.set(record["redis_rtt_ms"] / 1000)
        metrics.loop_lag.set(record["loop_lag_ms"] / 1000)
        metrics.draining.set(1 if record["draining"] else 0)

    def _write_users(self, pipe: Any, changes: int) -> frozenset[str]:
        """Queue the changes to this node's user set; the users it will hold.

        Summing per-node user counts counts a user on two nodes twice; the union of
        every node's set counts distinct users (common/transport/stats.distinct_users).
        Only the difference since the last write is sent (the whole set after an error),
        and only its expiry while the hub has not changed since (`changes`).
        """
        state = self._state
        key = state.keys.stats_users(state.settings.node_id)
        known = self._users_written
        if known is not None and changes == self._users_changes:
            pipe.pexpire(key, int(state.settings.lease_ttl * 1000))
            return known
        users = frozenset(state.hub.users)
        if known is None:
            pipe.delete(key)
            added, removed = sorted(users), []
        else:
            added, removed = sorted(users - known), sorted(known - users)
        for start in range(0, len(removed), HASH_CHUNK):
            pipe.srem(key, *removed[start : start + HASH_CHUNK])
        for start in range(0, len(added), HASH_CHUNK):
            pipe.sadd(key, *added[start : start + HASH_CHUNK])
        pipe.pexpire(key, int(state.settings.lease_ttl * 1000))
        return users

    def _sync_connections(self, pipe: Any, changes: int) -> set[str] | None:
        """Queue the changes to the connection hash; the ids it will hold, or None if unchanged."""
        state = self._state
        key = state.keys.node_connections(state.settings.node_id)
        pipe.pexpire(key, int(state.settings.lease_ttl * 1000))
        now = time.monotonic()
        if self._synced and (
            changes == self._synced_changes or now - self._synced_at < CONNECTIONS_SYNC_EVERY
        ):
            return None
        self._synced_at = now
        current = {conn.conn_id: conn for conn in state.hub.connections()}
        if self._synced:
            added = [current[c] for c in current.keys() - self._written]
            removed = list(self._written - current.keys())
        else:
            added, removed = list(current.values()), []
            pipe.delete(key)
        for start in range(0, len(removed), HASH_CHUNK):
            pipe.hdel(key, *removed[start : start + HASH_CHUNK])
        for start in range(0, len(added), HASH_CHUNK):
            chunk = added[start : start + HASH_CHUNK]
            pipe.hset(
                key,
                mapping={
                    c.conn_id: orjson.dumps(
                        {
                            "user_id": c.user_id,
                            "device_id": c.device_id,
                            "connected_at": round(c.connected_at, 3),
                        }
                    )
                    for c in chunk
                },
            )
        if added:
            pipe.pexpire(key, int(state.settings.lease_ttl * 1000))
        return set(current)

    async def _historian(self) -> None:
        """Append the cluster totals to the history, if this node holds the historian lease."""
        state = self._state
        if not await self._leases.hold(state.keys.stats_historian):
            return
        nodes, workers, depths = await asyncio.gather(
            read_processes(state.redis, state.keys, NODE),
            read_processes(state.redis, state.keys, WORKER),
            queue_depths(state.redis, state.keys, state.settings.partitions),
        )
        state.metrics.set_queue_depth(depths)
        users = await distinct_users(state.redis, state.keys, nodes)
        # Kept for /admin/stats (every dashboard polls it): one union per interval.
        await state.redis.set(
            state.keys.stats_users_total, users, px=int(state.settings.stats_interval * 2000)
        )
        totals = summarize(nodes, workers, sum(depths.values()), users)
        await append_history(
            state.redis, state.keys, history_point(totals, int(time.time() * 1000))
        )
