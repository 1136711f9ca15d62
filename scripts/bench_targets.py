"""scripts/bench.py's last section: issue 17's targets 1-6, each measured value (median and
range over the runs) beside its baseline from the same run, the ratio, the bound, and
whether it is met.

Pure functions from what bench.py has at the end: the tables' results (bench_plan.Result),
the side benchmarks' JSON documents (or why there is none), and the chat results of the
`--base-tree` if one was given; the rows and their verdicts are bench_rows.py's.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from bench_plan import Result
from bench_rows import Bound, Row, Spread, dig, find, spread, values, why_missing

IDLE_PER = 10_000  # target 4 counts cores per this many idle connections on a node
FELL_BEHIND = 0.95  # completed/sent below this: the workers drained after the window


def chat_cpu_ms(report: dict[str, Any]) -> dict[str, float] | None:
    """CPU per chat sent in the window, ms, of each process group (from its cores over the
    window); "system" is nodes + workers + Redis + Postgres."""
    per_s = dig(report, "chat", "chats_per_s")
    if not per_s:
        return None
    lt = report.get("loadtest") or {}
    cores = {
        "nodes+workers": dig(report, "servers", "cpu_cores") or 0.0,
        "Redis": float(lt.get("redis_cpu_cores") or 0.0),
        "Postgres": float(lt.get("postgres_cpu_cores") or 0.0),
        "generator": float(lt.get("cpu_cores") or 0.0),
        "other": float(lt.get("other_cpu_cores") or 0.0),
    }
    ms = {k: 1000 * c / per_s for k, c in cores.items()}
    ms["system"] = ms["nodes+workers"] + ms["Redis"] + ms["Postgres"]
    return ms


def chat_rows(
    results: Sequence[Result], chat_rate: float, base: Sequence[Result] | None
) -> list[Row]:
    """Target 1: latency and loss at `chat_rate`; CPU per chat at 200/s and `chat_rate`
    against the base tree's (≤ half)."""
    fast = find(results, "chat", "fanout", rate=chat_rate)
    why = why_missing(fast, f"chat @ {chat_rate:,.0f}/s")
    label = f"chat @ {chat_rate:,.0f}/s"
    rows = [
        Row(
            1,
            f"{label}: send→ack p99",
            " ms",
            spread(values(fast, "chat", "ack_ms", "p99")),
            None,
            Bound(10, True),
            why,
        ),
        Row(
            1,
            f"{label}: send→reply on all devices p99",
            " ms",
            spread(values(fast, "chat", "reply_ms", "p99")),
            None,
            Bound(50, True),
            why,
        ),
        Row(
            1,
            f"{label}: lost (most of any run)",
            "",
            _most(values(fast, "lost")),
            None,
            Bound(0, True),
            why,
            ",.0f",
        ),
    ]
    for rate in dict.fromkeys((200.0, chat_rate)):
        ours = find(results, "chat", "fanout", rate=rate)
        theirs = find(base, "chat", "fanout", rate=rate) if base is not None else None
        reports = ours.reports if ours else []
        cpu = [c for c in map(chat_cpu_ms, reports) if c]
        what = f"chat @ {rate:,.0f}/s: CPU per chat, nodes+workers+Redis+Postgres"
        if cpu:
            parts = ", ".join(
                f"{k} {statistics.median(c[k] for c in cpu):.2f}"
                for k in ("nodes+workers", "Redis", "Postgres", "generator", "other")
            )
            what += f" ({parts} ms)"
            if any(map(_fell_behind, reports)):
                what += "; workers fell behind: the window's CPU undercounts"
        if ours is None or not cpu:
            missing = why_missing(ours, f"chat @ {rate:,.0f}/s")
        elif base is None:
            missing = "no base tree given (--base-tree)"
        else:
            missing = why_missing(theirs, f"base tree's chat @ {rate:,.0f}/s")
        base_cpu = [c for c in map(chat_cpu_ms, theirs.reports if theirs else []) if c]
        rows.append(
            Row(
                1,
                what,
                " ms",
                spread(c["system"] for c in cpu),
                spread(c["system"] for c in base_cpu),
                Bound(0.5, True, of_ratio=True),
                missing,
            )
        )
    return rows


def _fell_behind(report: dict[str, Any]) -> bool:
    sent = dig(report, "chat", "chats_per_s") or 0.0
    return (dig(report, "chat", "replied_per_s") or 0.0) < FELL_BEHIND * sent


def _most(found: list[float | None]) -> Spread | None:
    """The largest as the figure (lost: one run losing is enough), with the range."""
    s = spread(found)
    return None if s is None else Spread(s.high, s.low, s.high, s.runs)


def redis_us_per_delivery(report: dict[str, Any]) -> float | None:
    """Redis' CPU (INFO cpu: the whole server) over the window per delivery, µs."""
    cores = dig(report, "loadtest", "redis_cpu_cores")
    per_s = dig(report, "deliveries_per_s")
    if cores is None or not per_s:
        return None
    return 1e6 * float(cores) / per_s


def redis_rows(results: Sequence[Result], redis: Mapping[str, Any] | str) -> list[Row]:
    """Target 2: Redis CPU per delivery against a bare PUBLISH (the redis side bench: the
    delivery script's own cost, no subscribers), against the forwarder's at the same fixed
    rates (the fan-out rows: all of Redis' CPU, the nodes' pub/sub included), and the
    machine's maximum deliveries/s against the forwarder's (best node count each)."""
    if isinstance(redis, str):
        ours = theirs = None
        why = f"redis side bench: {redis}"
    else:
        runs = redis.get("runs", {})
        ours = spread(r["us_per_delivery"] for r in runs.get("this", []))
        theirs = spread(r["us_per_delivery"] for r in runs.get("publish", []))
        why = "redis side bench: no runs"
    rate = "" if isinstance(redis, str) else f" at {redis.get('rate', 0):,.0f}/s"
    rows = [
        Row(
            2,
            f"Redis CPU per delivery{rate} (baseline: a bare PUBLISH)",
            " µs",
            ours,
            theirs,
            Bound(2, True, of_ratio=True),
            why,
        ),
    ]
    for fixed in (4000.0, 10000.0):
        ours_rate = find(results, "rate", "fanout", rate=fixed)
        theirs_rate = find(results, "rate", "baseline", rate=fixed)
        rows.append(
            Row(
                2,
                f"Redis CPU per delivery at a fixed {fixed:,.0f}/s, 2 nodes, all of Redis'"
                " CPU over the window (baseline: the forwarder)",
                " µs",
                spread(map(redis_us_per_delivery, ours_rate.reports if ours_rate else [])),
                spread(map(redis_us_per_delivery, theirs_rate.reports if theirs_rate else [])),
                Bound(2, True, of_ratio=True),
                _either(ours_rate, theirs_rate, f"rate {fixed:,.0f}/s"),
            )
        )
    best: dict[str, Spread | None] = {}
    for system in ("fanout", "baseline"):
        found = [
            spread(values(r, "deliveries_per_s"))
            for r in results
            if r.scenario.kind == "max" and r.spec.system == system and r.spec.mode in ("user", "-")
        ]
        best[system] = max((s for s in found if s), key=lambda s: s.median, default=None)
    why = _either(find(results, "max", "fanout"), find(results, "max", "baseline"), "max x2")
    rows.append(
        Row(
            2,
            "machine's maximum deliveries/s (best node count; baseline: the forwarder)",
            "/s",
            best["fanout"],
            best["baseline"],
            Bound(1, False, of_ratio=True),
            why,
            ",.0f",
        )
    )
    return rows


def node_rows(results: Sequence[Result]) -> list[Row]:
    """Target 3: deliveries per node CPU-second (max, 2 nodes) ≥ 2.5× the forwarder's; p99
    at fixed 4,000/s and 10,000/s ≤ the forwarder's."""
    ours, theirs = find(results, "max", "fanout"), find(results, "max", "baseline")
    path = ("servers", "deliveries_per_cpu_s")
    rows = [
        Row(
            3,
            "deliveries per node CPU-s, max, 2 nodes (baseline: the forwarder)",
            "",
            spread(values(ours, *path)),
            spread(values(theirs, *path)),
            Bound(2.5, False, of_ratio=True),
            _either(ours, theirs, "max x2"),
            ",.0f",
        ),
    ]
    for rate in (4000.0, 10000.0):
        ours, theirs = (
            find(results, "rate", "fanout", rate=rate),
            find(results, "rate", "baseline", rate=rate),
        )
        rows.append(
            Row(
                3,
                f"p99 at a fixed {rate:,.0f} deliveries/s, 2 nodes",
                " ms",
                spread(values(ours, "latency_ms", "p99")),
                spread(values(theirs, "latency_ms", "p99")),
                Bound(1, True, of_ratio=True),
                _either(ours, theirs, f"rate {rate:,.0f}/s"),
            )
        )
    return rows


def _either(ours: Result | None, theirs: Result | None, what: str) -> str:
    if ours is None or not ours.reports:
        return why_missing(ours, f"fanout {what}")
    return why_missing(theirs, f"baseline {what}")


def idle_cores_per_10k(report: dict[str, Any]) -> float | None:
    """A node's cores per 10,000 idle connections: all nodes' cores over the window, per
    node, scaled from the connections each held."""
    cores = dig(report, "servers", "cpu_cores")
    pids = (report.get("servers") or {}).get("pids") or []
    made = dig(report, "connections", "made")
    if cores is None or not pids or not made:
        return None
    return cores / len(pids) / (made / len(pids)) * IDLE_PER


def idle_rows(results: Sequence[Result]) -> list[Row]:
    """Target 4: ≤ 4 KiB RSS and ≤ 0.01 cores per 10,000 idle connections on a node."""
    # One node holds the idle connections (bench_plan.py).
    ours, theirs = find(results, "idle", "fanout", 1), find(results, "idle", "baseline", 1)
    why = why_missing(ours, "fanout idle")
    return [
        Row(
            4,
            "idle: node RSS per connection (baseline: the forwarder)",
            " KiB",
            spread(values(ours, "servers", "rss_per_connection_kib")),
            spread(values(theirs, "servers", "rss_per_connection_kib")),
            Bound(4, True),
            why,
        ),
        Row(
            4,
            "idle: a node's cores per 10,000 connections (baseline: the forwarder)",
            "",
            spread(map(idle_cores_per_10k, ours.reports if ours else [])),
            spread(map(idle_cores_per_10k, theirs.reports if theirs else [])),
            Bound(0.01, True),
            why,
            ".4f",
        ),
    ]


def handover_rows(handover: Mapping[str, Any] | str) -> list[Row]:
    """Target 5: reply latency while a worker joins and one leaves at 500 chats/s."""
    runs = [] if isinstance(handover, str) else handover.get("runs", {}).get("this", [])
    why = f"handover side bench: {handover}" if isinstance(handover, str) else "no runs"
    rate = "" if isinstance(handover, str) else f" at {handover.get('rate', 0):,.0f} chats/s"
    return [
        Row(
            5,
            f"worker joins and leaves{rate}: send→reply {key}",
            " ms",
            spread(dig(r, "chat", "reply_ms", key) for r in runs),
            None,
            Bound(500, True),
            why,
            ",.0f",
        )
        for key in ("p99", "max")
    ]


def assistant_rows(assistant: Mapping[str, Any] | str) -> list[Row]:
    """Target 6: the OpenAI-compatible generator against a local fake with webhooks on,
    chat latency within 10% of echo without webhooks."""
    if isinstance(assistant, str):
        ours, theirs, why = [], [], f"assistant side bench: {assistant}"
        rate = ""
    else:
        runs = assistant.get("runs", {})
        ours, theirs, why = runs.get("openai+hooks", []), runs.get("echo", []), "no runs"
        rate = f" at {assistant.get('rate', 0):,.0f} chats/s"
    return [
        Row(
            6,
            f"openai (local fake) + webhooks{rate}: send→reply {key} (baseline: echo, no webhooks)",
            " ms",
            spread(dig(r, "chat", "reply_ms", key) for r in ours),
            spread(dig(r, "chat", "reply_ms", key) for r in theirs),
            Bound(1.1, True, of_ratio=True),
            why,
        )
        for key in ("p50", "p99")
    ]


def target_rows(
    results: Sequence[Result],
    side: Mapping[str, Mapping[str, Any] | str],
    chat_rate: float,
    base: Sequence[Result] | None = None,
) -> list[Row]:
    """Every target's rows; `side` holds each side bench's JSON document or why it has none."""

    def of(kind: str) -> Mapping[str, Any] | str:
        return side.get(kind, "not run (--kinds/--only)")

    return [
        *chat_rows(results, chat_rate, base),
        *redis_rows(results, of("redis")),
        *node_rows(results),
        *idle_rows(results),
        *handover_rows(of("handover")),
        *assistant_rows(of("assistant")),
    ]
