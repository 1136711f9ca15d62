"""The load generator's bookkeeping: latency histogram, seq accounting, /proc readings, report.

Everything here runs on the receive path of thousands of sockets or once at the end,
so the per-frame parts are a few integer operations: a latency goes into a
log-linear histogram (1 µs steps below 2 ms, then 1/1024 relative precision), and a
device's received seqs are kept as ranges (they arrive increasing, so a run of
contiguous seqs is one range however long it is).
"""

from __future__ import annotations

import os
from bisect import bisect_left, bisect_right
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import accumulate
from operator import sub
from pathlib import Path
from typing import Any

_LINEAR = 2048  # below this many µs every µs has its own bucket
_SUB = 1024  # buckets per power of two above it
_MAX_SHIFT = 30  # latencies are capped at 2048 << 30 µs (≈ 25 days)
_TICK = os.sysconf("SC_CLK_TCK")


class LatencyHistogram:
    """Microsecond latencies with ≈0.1 % precision in fixed memory (no per-sample storage)."""

    __slots__ = ("count", "counts", "max_us")

    def __init__(self) -> None:
        self.counts = [0] * (_LINEAR + _MAX_SHIFT * _SUB)
        self.count = 0
        self.max_us = 0

    def record(self, us: int) -> None:
        if us < _LINEAR:
            self.counts[us if us > 0 else 0] += 1
        else:
            shift = min(us.bit_length() - 11, _MAX_SHIFT)
            self.counts[_LINEAR + (shift - 1) * _SUB + min((us >> shift) - _SUB, _SUB - 1)] += 1
        self.count += 1
        if us > self.max_us:
            self.max_us = us

    def percentile(self, q: float, since: list[int] | None = None) -> float:
        """The q-quantile (0..1) in µs (the top of its bucket); `since`: of what came after
        that `snapshot()` only."""
        counts = self.counts if since is None else list(map(sub, self.counts, since))
        total = self.count if since is None else sum(counts)
        if not total:
            return 0.0
        rank = max(1, round(q * total))
        # accumulate + bisect run in C: the progress line asks every second.
        index = bisect_left(list(accumulate(counts)), rank)
        return float(min(_bucket_top(index), self.max_us))

    def snapshot(self) -> list[int]:
        return list(self.counts)

    def sparse(self) -> dict[str, Any]:
        """The counts as JSON (non-empty buckets only), for `merge` in another process."""
        counts = {str(i): n for i, n in enumerate(self.counts) if n}
        return {"counts": counts, "max_us": self.max_us}

    def merge(self, sparse: dict[str, Any]) -> None:
        for index, n in sparse["counts"].items():
            self.counts[int(index)] += n
            self.count += n
        self.max_us = max(self.max_us, sparse["max_us"])

    def summary_ms(self) -> dict[str, float]:
        return {
            "count": self.count,
            "p50": round(self.percentile(0.50) / 1000, 3),
            "p95": round(self.percentile(0.95) / 1000, 3),
            "p99": round(self.percentile(0.99) / 1000, 3),
            "max": round(self.max_us / 1000, 3),
        }


def _bucket_top(index: int) -> int:
    if index < _LINEAR:
        return index
    shift, sub = divmod(index - _LINEAR, _SUB)
    return ((sub + _SUB + 1) << (shift + 1)) - 1


def percentiles_ms(seconds: list[float]) -> dict[str, float]:
    """p50/p99/max of a small sample (connect times), in ms."""
    if not seconds:
        return {"count": 0, "p50": 0.0, "p99": 0.0, "max": 0.0}
    ordered = sorted(seconds)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)

    return {"count": len(ordered), "p50": at(0.50), "p99": at(0.99), "max": at(1.0)}


class SeqRanges:
    """A set of seqs as sorted, disjoint [first, last] ranges; cheap for increasing adds."""

    __slots__ = ("ranges",)

    def __init__(self) -> None:
        self.ranges: list[list[int]] = []

    def add(self, seq: int) -> None:
        ranges = self.ranges
        if ranges:
            tail = ranges[-1]
            if seq == tail[1] + 1:
                tail[1] = seq
                return
            if seq > tail[1]:
                ranges.append([seq, seq])
                return
            self._insert(seq)
        else:
            ranges.append([seq, seq])

    def _insert(self, seq: int) -> None:
        # Rare: a seq below the newest (it came late). Insert, then merge neighbours.
        if seq in self:
            return
        ranges = self.ranges
        at = bisect_right(ranges, [seq, seq])
        ranges.insert(at, [seq, seq])
        for i in (at, at - 1):
            if 0 <= i < len(ranges) - 1 and ranges[i][1] + 1 == ranges[i + 1][0]:
                ranges[i][1] = ranges[i + 1][1]
                del ranges[i + 1]

    def __contains__(self, seq: object) -> bool:
        if not isinstance(seq, int):
            return False
        at = bisect_right(self.ranges, [seq, float("inf")]) - 1
        return at >= 0 and self.ranges[at][0] <= seq <= self.ranges[at][1]

    def __len__(self) -> int:
        return sum(last - first + 1 for first, last in self.ranges)

    def missing_from(self, wanted: SeqRanges, above: int = 0) -> int:
        """How many seqs of `wanted` greater than `above` are not in this set."""
        missing = 0
        for first, last in wanted.ranges:
            first = max(first, above + 1)
            if first > last:
                continue
            missing += last - first + 1 - self._covered(first, last)
        return missing

    def _covered(self, first: int, last: int) -> int:
        covered = 0
        for a, b in self.ranges:
            if b < first:
                continue
            if a > last:
                break
            covered += min(b, last) - max(a, first) + 1
        return covered


# -- /proc ------------------------------------------------------------------------------


def cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU time of a process, from /proc/PID/stat (0.0 if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # The command name may contain spaces and parentheses: fields start after the last ")".
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def postgres_cpu_seconds() -> dict[int, float]:
    """User + system CPU time of every process whose /proc/PID/comm is "postgres" (the
    servers' postmasters and backends), by pid."""
    found: dict[int, float] = {}
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() != "postgres":
                continue
        except OSError:
            continue
        pid = int(comm.parent.name)
        found[pid] = cpu_seconds(pid)
    return found


def machine_busy_seconds() -> float:
    """CPU time the whole machine spent busy since boot, all CPUs (from /proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields)
    return (user + nice + system + irq + softirq + steal) / _TICK


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of a process, from /proc/PID/status (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# -- the report -------------------------------------------------------------------------


@dataclass
class Report:
    """What a run measured; `as_json()` is the `--json` document, `text()` the summary."""

    mode: str
    urls: list[str]
    settings: dict[str, Any]
    connections: dict[str, Any] = field(default_factory=dict)
    window_s: float = 0.0
    published: int = 0
    expected: int = 0
    delivered: int = 0
    delivered_in_window: int = 0
    latency_ms: dict[str, float] = field(default_factory=dict)
    publish_ms: dict[str, float] | None = None
    lost: int = 0
    duplicated: int = 0
    out_of_order: int = 0
    gaps: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    chat: dict[str, Any] | None = None
    loadtest: dict[str, Any] = field(default_factory=dict)
    servers: dict[str, Any] | None = None
    # A shard's histograms and connect times, for the parent to merge (not printed).
    raw: dict[str, Any] | None = None

    @property
    def deliveries_per_s(self) -> float:
        return self.delivered_in_window / self.window_s if self.window_s else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def set_costs(
        self, *, own_cpu: float, rss: int, rss_grown: int, redis_cpu: float, postgres_cpu: float
    ) -> None:
        """The load generator's own cost over the window (CPU from /proc/self/stat), and
        Redis' (INFO cpu) and Postgres' (its processes' /proc/PID/stat)."""
        window = self.window_s or 1.0
        per_s = self.deliveries_per_s
        made = max(1, self.connections.get("made", 0))
        self.loadtest = {
            "cpu_seconds": round(own_cpu, 3),
            "cpu_cores": round(own_cpu / window, 3),
            "cores_per_1000_per_s": round(own_cpu / window / (per_s / 1000), 4) if per_s else 0.0,
            "us_per_delivery": round(own_cpu / self.delivered_in_window * 1e6, 2)
            if self.delivered_in_window
            else 0.0,
            "rss_mib": round(rss / 2**20, 1),
            "rss_per_connection_kib": round(rss_grown / 1024 / made, 2),
            "redis_cpu_cores": round(redis_cpu / window, 3),
            "postgres_cpu_cores": round(postgres_cpu / window, 3),
        }

    def set_contention(self, *, machine_cpu: float, lag: LatencyHistogram) -> None:
        """What says whether this process measured the cluster or its own waits: how late
        its event loop woke (a late wake-up is added to every latency it takes meanwhile)
        and how many cores processes other than it, the servers, Redis and Postgres used."""
        window = self.window_s or 1.0
        servers = self.servers["cpu_seconds"] if self.servers else 0.0
        ours = self.loadtest.get("cpu_seconds", 0.0) + servers
        redis = self.loadtest.get("redis_cpu_cores", 0.0) * window
        postgres = self.loadtest.get("postgres_cpu_cores", 0.0) * window
        other = machine_cpu - ours - redis - postgres
        self.loadtest["loop_lag_ms"] = lag.summary_ms()
        self.loadtest["other_cpu_cores"] = round(max(0.0, other) / window, 3)

    def set_servers(
        self, pids: Iterable[int], cpu: float, rss_before: list[int], rss_after: list[int]
    ) -> None:
        """The nodes' cost over the window: CPU and RSS growth per connection, from /proc."""
        made = self.connections.get("made", 0)
        self.servers = {
            "pids": list(pids),
            "cpu_seconds": round(cpu, 3),
            "cpu_cores": round(cpu / (self.window_s or 1.0), 3),
            "deliveries_per_cpu_s": round(self.delivered_in_window / cpu) if cpu else None,
            "rss_mib": [round(r / 2**20, 1) for r in rss_after],
            "rss_per_connection_kib": round((sum(rss_after) - sum(rss_before)) / 1024 / made, 2)
            if made
            else None,
        }

    def as_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "urls": self.urls,
            "settings": self.settings,
            "connections": self.connections,
            "window_s": round(self.window_s, 3),
            "published": self.published,
            "expected": self.expected,
            "delivered": self.delivered,
            "deliveries_per_s": round(self.deliveries_per_s, 1),
            "latency_ms": self.latency_ms,
            "publish_ms": self.publish_ms,
            "lost": self.lost,
            "duplicated": self.duplicated,
            "out_of_order": self.out_of_order,
            "gaps": self.gaps,
            "errors": {"total": self.error_count, **self.errors},
            "chat": self.chat,
            "loadtest": self.loadtest,
            "servers": self.servers,
            **({"raw": self.raw} if self.raw is not None else {}),
        }

    def text(self) -> str:
        c, lat = self.connections, self.latency_ms
        lines = [
            f"fanout loadtest: mode {self.mode}, {len(self.urls)} node URL(s), "
            f"{self.window_s:.1f} s measured",
            f"  connections  {c.get('made', 0)} made, {c.get('failed', 0)} failed, "
            f"{c.get('reconnects', 0)} reconnects; connect p50 "
            f"{c.get('connect_ms', {}).get('p50', 0)} ms, p99 "
            f"{c.get('connect_ms', {}).get('p99', 0)} ms",
        ]
        if self.mode != "idle":
            lines += [
                f"  deliveries   {self.delivered} of {self.expected} expected "
                f"({self.published} published), {self.deliveries_per_s:,.0f}/s",
                f"  latency      p50 {lat.get('p50', 0)} ms, p95 {lat.get('p95', 0)} ms, "
                f"p99 {lat.get('p99', 0)} ms, max {lat.get('max', 0)} ms "
                f"({'publish' if self.mode == 'fanout' else 'send'} -> receipt)",
            ]
        if self.publish_ms:
            p = self.publish_ms
            lines.append(
                f"  publish      Bus.deliver call p50 {p['p50']} ms, p99 {p['p99']} ms, "
                f"max {p['max']} ms"
            )
        if self.mode != "idle":
            lines += [
                f"  lost {self.lost}, duplicated {self.duplicated}, out-of-order "
                f"{self.out_of_order}, seq gaps {self.gaps}",
            ]
        if self.chat:
            ch = self.chat
            lines.append(
                f"  chat         {ch['sent']} sent, {ch['acked']} acked, "
                f"{ch['chats_per_s']:,.0f}/s sent, {ch['replied_per_s']:,.0f}/s completed; "
                f"send->ack p99 {ch['ack_ms']['p99']} ms; send->reply on all devices "
                f"p50 {ch['reply_ms']['p50']} ms, p99 {ch['reply_ms']['p99']} ms"
            )
        errors = ", ".join(f"{k} {v}" for k, v in sorted(self.errors.items()) if v) or "none"
        lines.append(f"  errors       {self.error_count} ({errors})")
        lt = self.loadtest
        lines.append(
            f"  loadtest     {lt.get('cpu_cores', 0):.2f} cores, "
            f"{lt.get('cores_per_1000_per_s', 0):.3f} cores per 1000 deliveries/s, "
            f"RSS {lt.get('rss_mib', 0):.0f} MiB"
        )
        if "loop_lag_ms" in lt:
            lag = lt["loop_lag_ms"]
            lines.append(
                f"  contention   load generator loop lag p99 {lag['p99']} ms, max "
                f"{lag['max']} ms; other processes {lt['other_cpu_cores']:.2f} cores"
            )
        if self.servers:
            s = self.servers
            line = f"  servers      {s['cpu_cores']:.2f} cores"
            if s.get("deliveries_per_cpu_s"):
                line += f", {s['deliveries_per_cpu_s']:,.0f} deliveries per CPU-second"
            if s.get("rss_per_connection_kib") is not None:
                line += f", {s['rss_per_connection_kib']:.1f} KiB RSS per connection"
            lines.append(line)
        return "\n".join(lines)
