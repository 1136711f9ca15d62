"""The cluster's USERS against the real Redis: each user once, however many nodes hold
them — exact while the nodes' sets are small, sampled (never one long command) when large."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from common.transport import cluster_stats
from common.transport.keys import Keys

NODES = [{"id": "node-1"}, {"id": "node-2"}, {"id": "node-3"}]


async def _fill(redis: aioredis.Redis, keys: Keys, members: dict[str, range]) -> None:
    for node, users in members.items():
        names = [f"user-{i}" for i in users]
        for start in range(0, len(names), 5_000):
            await redis.sadd(keys.stats_users(node), *names[start : start + 5_000])


async def test_small_sets_are_counted_exactly(redis: aioredis.Redis, namespace: str) -> None:
    keys = Keys(namespace)
    # 0..2999 on node-1, 2000..4999 on node-2, every one of node-1's again on node-3.
    await _fill(
        redis, keys, {"node-1": range(3_000), "node-2": range(2_000, 5_000), "node-3": range(3_000)}
    )
    assert await cluster_stats.distinct_users(redis, keys, NODES) == 5_000
    assert await cluster_stats.distinct_users(redis, keys, []) == 0


async def test_large_sets_are_estimated_by_sampling_within_a_few_percent(
    redis: aioredis.Redis, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = Keys(namespace)
    # 30,000 distinct users, 16,000 of them on two nodes: a sum over nodes says 46,000.
    await _fill(
        redis,
        keys,
        {
            "node-1": range(0, 20_000),
            "node-2": range(12_000, 30_000),
            "node-3": range(4_000, 12_000),
        },
    )
    unions: list[object] = []
    monkeypatch.setattr(cluster_stats, "EXACT_USERS_UP_TO", 10_000)
    original = aioredis.client.Pipeline.sunionstore
    monkeypatch.setattr(
        aioredis.client.Pipeline,
        "sunionstore",
        lambda self, *args, **kw: unions.append(args) or original(self, *args, **kw),
    )
    counted = await cluster_stats.distinct_users(redis, keys, NODES)
    assert unions == [], "no O(users) union past the exact bound"
    assert abs(counted - 30_000) <= 0.05 * 30_000, counted
