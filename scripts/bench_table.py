"""scripts/bench.py's output: medians of a scenario's reports as Markdown tables, with
ratios to the baseline from the same run, and the machine they were measured on."""

from __future__ import annotations

import os
import platform
import statistics
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

from bench_plan import Result


def med(reports: list[dict[str, Any]], *path: str) -> float | None:
    values = []
    for report in reports:
        value: Any = report
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, int | float):
            values.append(float(value))
    return statistics.median(values) if values else None


def fmt(value: float | None, spec: str = ",.0f") -> str:
    return "—" if value is None else format(value, spec)


Column = tuple[str, tuple[str, ...], str]  # header, path in the report, format

DELIVERY: list[Column] = [
    ("deliveries/s", ("deliveries_per_s",), ",.0f"),
    ("node CPU (cores)", ("servers", "cpu_cores"), ".2f"),
    ("deliveries per node CPU-s", ("servers", "deliveries_per_cpu_s"), ",.0f"),
    ("p50 ms", ("latency_ms", "p50"), ".2f"),
    ("p95 ms", ("latency_ms", "p95"), ".2f"),
    ("p99 ms", ("latency_ms", "p99"), ".2f"),
    ("max ms", ("latency_ms", "max"), ".1f"),
    ("lost", ("lost",), ",.0f"),
    ("loadtest cores", ("loadtest", "cpu_cores"), ".2f"),
    ("Redis cores", ("loadtest", "redis_cpu_cores"), ".2f"),
    ("Postgres cores", ("loadtest", "postgres_cpu_cores"), ".2f"),
    # How far the run measured the cluster rather than the machine: the load
    # generator's own loop lag adds to every latency it takes, and other jobs' cores.
    ("loadtest loop lag max ms", ("loadtest", "loop_lag_ms", "max"), ".1f"),
    ("other processes cores", ("loadtest", "other_cpu_cores"), ".2f"),
]
IDLE: list[Column] = [
    ("connections made", ("connections", "made"), ",.0f"),
    ("failed", ("connections", "failed"), ",.0f"),
    ("connect p50 ms", ("connections", "connect_ms", "p50"), ".1f"),
    ("connect p99 ms", ("connections", "connect_ms", "p99"), ".1f"),
    ("node RSS per connection (KiB)", ("servers", "rss_per_connection_kib"), ".1f"),
]
CHAT: list[Column] = [
    ("sent chats/s", ("chat", "chats_per_s"), ",.0f"),
    ("completed chats/s", ("chat", "replied_per_s"), ",.0f"),
    ("send→ack p50 ms", ("chat", "ack_ms", "p50"), ".2f"),
    ("send→ack p99 ms", ("chat", "ack_ms", "p99"), ".2f"),
    ("send→message on all devices p99 ms", ("chat", "message_on_all_devices_ms", "p99"), ".1f"),
    ("send→reply on all devices p50 ms", ("chat", "reply_ms", "p50"), ".1f"),
    ("send→reply on all devices p99 ms", ("chat", "reply_ms", "p99"), ".1f"),
    ("lost", ("lost",), ",.0f"),
    ("nodes+workers CPU (cores)", ("servers", "cpu_cores"), ".2f"),
    ("Redis cores", ("loadtest", "redis_cpu_cores"), ".2f"),
    ("Postgres cores", ("loadtest", "postgres_cpu_cores"), ".2f"),
    ("other processes cores", ("loadtest", "other_cpu_cores"), ".2f"),
]
RATIOS = [("deliveries_per_s",), ("servers", "deliveries_per_cpu_s"), ("latency_ms", "p99")]


def table(results: list[Result], columns: list[Column]) -> list[str]:
    heads = ["scenario", "system", "nodes", *(c[0] for c in columns), "runs"]
    out = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in results:
        system = r.spec.system + (f" ({r.spec.mode})" if r.spec.system == "fanout" else "")
        cells = [fmt(med(r.reports, *path), spec) for _, path, spec in columns]
        row = [r.scenario.label, system, str(r.spec.nodes), *cells, str(len(r.reports))]
        out.append("| " + " | ".join(row) + " |")
    return out


def tables(results: list[Result]) -> str:
    measured = [r for r in results if r.reports]
    delivery = [r for r in measured if r.scenario.kind in ("max", "rate")]
    out: list[str] = []
    if delivery:
        out += [*table(delivery, DELIVERY), ""]
        out += ["Ratios, fanout ÷ baseline from the same run (p99: lower is better):", ""]
        out += ["| scenario | fanout mode | nodes | deliveries/s | per node CPU-s | p99 |"]
        out += ["|---|---|---|---|---|---|"]
    base = {(r.scenario, r.spec.nodes): r.reports for r in delivery if r.spec.system == "baseline"}
    for r in delivery:
        b = base.get((r.scenario, r.spec.nodes))
        if r.spec.system == "fanout" and b:
            cells = [_ratio(med(r.reports, *k), med(b, *k)) for k in RATIOS]
            row = [r.scenario.label, r.spec.mode, str(r.spec.nodes), *cells]
            out.append("| " + " | ".join(row) + " |")
    for kind, columns in (("idle", IDLE), ("chat", CHAT)):
        chosen = [r for r in measured if r.scenario.kind == kind]
        if chosen:
            out += ["", *table(chosen, columns)]
    failed = [f"{r.spec.name} {r.scenario.label}: {f}" for r in results for f in r.failures]
    if failed:
        out += ["", "Not measured:", *(f"- {f}" for f in failed)]
    return "\n".join(out).strip("\n")


def _ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or not b else f"{a / b:.2f}×"


def machine() -> str:
    model = "unknown CPU"
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (
        f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs ({model}), Linux "
        f"{platform.release()}, Python {platform.python_version()}; load generator, "
        "nodes, workers, Redis and Postgres all on this machine"
    )
