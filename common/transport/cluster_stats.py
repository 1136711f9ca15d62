"""The cluster view of the stats (SPEC §7): every process's record read back and summed up.

Each node and worker writes its record (common/transport/stats.py); this reads the live
ones back and makes the cluster totals of /admin/stats and the dashboard: sums, worst
cases, a p99 from the merged latency histograms, and users counted once however many
nodes hold them. One node at a time (the historian) also appends the totals to a stream
trimmed to the last minutes, so a dashboard opened now can draw the minutes before it.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis

from common.transport.keys import Keys
from common.transport.stats import now_ms

# Processes of one kind read back (a bound on one read, far above a real cluster).
MAX_PROCESSES = 1000
HISTORY_SECONDS = 600
# Points returned by one history read (10 minutes at a 0.2 s interval).
MAX_HISTORY_POINTS = 3000
# Fields of a history point: the cluster totals the dashboard charts.
HISTORY_FIELDS = (
    "connections",
    "users",
    "messages_in_per_s",
    "messages_out_per_s",
    "latency_p99_ms",
    "queue_depth",
    "processed_per_s",
    "nodes",
    "workers",
)


async def read_processes(redis: aioredis.Redis, keys: Keys, kind: str) -> list[dict[str, Any]]:
    """The live processes of a kind, by id (entries past their TTL are not returned)."""
    ids: list[bytes] = await redis.zrangebyscore(  # type: ignore[assignment]
        keys.stats_index(kind), now_ms(), "+inf", start=0, num=MAX_PROCESSES
    )
    if not ids:
        return []
    raw: list[Any] = await redis.mget([keys.stats(kind, i.decode()) for i in ids])
    records = []
    for value in raw:
        if value is None:
            continue  # expired between the two reads
        with contextlib.suppress(orjson.JSONDecodeError):
            record = orjson.loads(value)
            if isinstance(record, dict):
                records.append(record)
    return sorted(records, key=lambda r: str(r.get("id")))


def queue_stats(
    depths: dict[int, int], owners: Sequence[bytes | str | None] | None = None
) -> dict[str, Any]:
    """The `queue` object of /admin/stats: total depth and one entry per partition."""
    partitions = []
    for partition, depth in sorted(depths.items()):
        entry: dict[str, Any] = {"partition": partition, "depth": depth}
        if owners is not None:
            owner = owners[partition] if partition < len(owners) else None
            entry["owner"] = owner.decode() if isinstance(owner, bytes) else owner
        partitions.append(entry)
    return {"depth": sum(depths.values()), "partitions": partitions}


def quantile(bounds: Sequence[float], counts: Sequence[int], q: float) -> float | None:
    """The q-quantile of a bucketed distribution, interpolated within its bucket.

    `counts` has one entry per bound plus the +Inf bucket; like Prometheus'
    histogram_quantile, a quantile in the +Inf bucket is the highest finite bound.
    """
    total = sum(counts)
    if total <= 0 or not bounds:
        return None
    rank = q * total
    below = 0
    for i, count in enumerate(counts):
        if count and below + count >= rank:
            if i >= len(bounds):
                return bounds[-1]
            lower = bounds[i - 1] if i > 0 else 0.0
            return lower + (bounds[i] - lower) * (rank - below) / count
        below += count
    return bounds[-1]


def merge_counts(rows: Iterable[Sequence[int]]) -> list[int]:
    """Bucket counts of several histograms added up, bucket by bucket."""
    merged: list[int] = []
    for row in rows:
        if len(merged) < len(row):
            merged.extend([0] * (len(row) - len(merged)))
        for i, count in enumerate(row):
            merged[i] += int(count)
    return merged


def _sum(records: list[dict[str, Any]], field: str) -> float:
    total = 0.0
    for record in records:
        value = record.get(field)
        if isinstance(value, int | float) and not isinstance(value, bool):
            total += value
    return round(total, 2)


def _max(records: list[dict[str, Any]], field: str) -> float | None:
    values = [r[field] for r in records if isinstance(r.get(field), int | float)]
    return max(values) if values else None


# Up to this many user entries (summed over the nodes' sets) the union is counted exactly;
# SUNIONSTORE costs Redis about 0.5 µs per entry in one command (50 ms per 100,000
# measured), a stall every other client would wait behind. Past it, each node's set is
# sampled instead: a bounded number of small commands, within a few percent.
EXACT_USERS_UP_TO = 10_000
USERS_SAMPLE = 1_000


async def distinct_users(redis: aioredis.Redis, keys: Keys, nodes: list[dict[str, Any]]) -> int:
    """Users connected anywhere in the cluster, each counted once (a user on two nodes is
    one user), from the nodes' user sets (node/stats.py), which share the {stats} slot:
    exact while they are small, estimated by sampling once they are large."""
    names = [keys.stats_users(str(n["id"])) for n in nodes if n.get("id")]
    if not names:
        return 0
    async with redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.scard(name)
        sizes = [int(size) for size in await pipe.execute()]
    if sum(sizes) <= EXACT_USERS_UP_TO:
        union = f"{keys.stats_users('union')}:{uuid.uuid4().hex}"
        async with redis.pipeline(transaction=False) as pipe:
            pipe.sunionstore(union, names)
            pipe.unlink(union)
            count, _ = await pipe.execute()
        return int(count)
    return await _estimated_union(redis, names, sizes)


async def _estimated_union(redis: aioredis.Redis, names: list[str], sizes: list[int]) -> int:
    """Each user counts for the first set that holds them: a set's share of the union is
    its size times the fraction of a sample of it that no earlier set holds."""
    total = 0.0
    for index, (name, size) in enumerate(zip(names, sizes, strict=True)):
        if size == 0:
            continue
        picked: Any = await redis.srandmember(name, USERS_SAMPLE)  # distinct members
        sample: list[bytes] = list(picked or [])
        if not sample:
            continue
        first_here = [True] * len(sample)
        for earlier in names[:index]:
            held = await redis.smismember(earlier, sample)
            first_here = [f and not h for f, h in zip(first_here, held, strict=True)]
        total += size * sum(first_here) / len(sample)
    return round(total)


async def users_total(redis: aioredis.Redis, keys: Keys, nodes: list[dict[str, Any]]) -> int:
    """distinct_users as the historian last wrote it (fresh within an interval), else counted."""
    kept = await redis.get(keys.stats_users_total)
    if kept is not None:
        return int(kept)
    return await distinct_users(redis, keys, nodes)


def summarize(
    nodes: list[dict[str, Any]],
    workers: list[dict[str, Any]],
    queue_depth: int,
    users: int | None = None,
) -> dict[str, Any]:
    """Cluster totals: sums of the per-process numbers, worst-case lags, merged p99.

    `users` is the distinct count (distinct_users); without it, the sum over nodes.
    """
    bounds: list[float] = next(
        (n["latency_bounds"] for n in nodes if isinstance(n.get("latency_bounds"), list)), []
    )
    merged = merge_counts(
        n["latency_counts"]
        for n in nodes
        if isinstance(n.get("latency_counts"), list) and n.get("latency_bounds") == bounds
    )
    p99 = quantile(bounds, merged, 0.99)
    processes = nodes + workers
    return {
        "nodes": len(nodes),
        "workers": len(workers),
        "draining_nodes": sum(1 for n in nodes if n.get("draining")),
        "draining_workers": sum(1 for w in workers if w.get("draining")),
        "connections": int(_sum(nodes, "connections")),
        "users": int(_sum(nodes, "users")) if users is None else users,
        "messages_in_per_s": _sum(nodes, "messages_in_per_s"),
        "messages_out_per_s": _sum(nodes, "messages_out_per_s"),
        "deliveries_per_s": _sum(nodes, "deliveries_per_s"),
        "drops_total": int(_sum(nodes, "drops_total")),
        "slow_consumer_closes_total": int(_sum(nodes, "slow_consumer_closes_total")),
        "latency_p99_ms": None if p99 is None else round(p99 * 1000, 3),
        "processed_per_s": _sum(workers, "processed_per_s"),
        "processed_total": int(_sum(workers, "processed_total")),
        "failures_total": int(_sum(workers, "failures_total")),
        "partitions_owned": int(_sum(workers, "partitions_owned")),
        "queue_depth": queue_depth,
        "redis_rtt_ms_max": _max(processes, "redis_rtt_ms"),
        "loop_lag_ms_max": _max(processes, "loop_lag_ms"),
        "gc_pause_ms_max": _max(processes, "gc_pause_ms"),
        "rss_bytes": int(_sum(processes, "rss_bytes")),
    }


def history_point(totals: dict[str, Any], at_ms: int) -> dict[str, Any]:
    """The part of the totals that the history keeps (and the dashboard charts)."""
    return {"t": at_ms, **{field: totals.get(field) for field in HISTORY_FIELDS}}


async def append_history(redis: aioredis.Redis, keys: Keys, point: dict[str, Any]) -> None:
    """Append a point; points older than HISTORY_SECONDS are trimmed as new ones come."""
    oldest = point["t"] - HISTORY_SECONDS * 1000
    async with redis.pipeline(transaction=False) as pipe:
        pipe.xadd(keys.stats_history, {"p": orjson.dumps(point)}, minid=oldest, approximate=True)
        # The whole stream goes when no historian has written for a while (cluster gone).
        pipe.expire(keys.stats_history, 2 * HISTORY_SECONDS)
        await pipe.execute()


async def read_history(
    redis: aioredis.Redis, keys: Keys, seconds: float = HISTORY_SECONDS
) -> list[dict[str, Any]]:
    """History points of the last `seconds`, oldest first (at most MAX_HISTORY_POINTS)."""
    since = now_ms() - int(seconds * 1000)
    entries: Any = await redis.xrevrange(
        keys.stats_history, max="+", min=str(since), count=MAX_HISTORY_POINTS
    )
    points = []
    for _, fields in reversed(entries):
        with contextlib.suppress(orjson.JSONDecodeError, KeyError):
            points.append(orjson.loads(fields[b"p"]))
    return points
