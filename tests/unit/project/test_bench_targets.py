"""scripts/bench_targets.py and bench_rows.py: issue 17's target rows from hand-made bench
results."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "scripts"))

from bench_plan import Result, Scenario, Spec
from bench_rows import Bound, Row, Spread, render, spread
from bench_targets import chat_cpu_ms, idle_cores_per_10k, target_rows


def result(
    kind: str, system: str, reports: list[dict[str, Any]], rate: float = 0.0, nodes: int = 2
) -> Result:
    mode = "user" if system == "fanout" else "-"
    return Result(Spec(system, nodes, mode), Scenario(kind, rate), reports)


def chat(ack: float, reply: float, lost: int = 0, cores: float = 1.0) -> dict[str, Any]:
    return {
        "chat": {
            "chats_per_s": 1000.0,
            "replied_per_s": 1000.0,
            "ack_ms": {"p99": ack},
            "reply_ms": {"p99": reply},
        },
        "lost": lost,
        "servers": {"cpu_cores": cores},
        "loadtest": {
            "redis_cpu_cores": 0.5,
            "postgres_cpu_cores": 0.25,
            "cpu_cores": 0.75,
            "other_cpu_cores": 0.1,
        },
    }


def rows_of(target: int, rows: list[Row]) -> list[Row]:
    return [r for r in rows if r.target == target]


def test_spread_is_the_median_and_range_of_what_was_measured() -> None:
    assert spread([3.0, None, 1.0, 2.0]) == Spread(2.0, 1.0, 3.0, 3)
    assert spread([None]) is None
    assert Spread(2.0, 1.0, 3.0, 3).text(".1f") == "2.0 (1.0–3.0)"
    assert Spread(2.0, 2.0, 2.0, 1).text(".1f") == "2.0"


def test_a_ratio_over_its_bound_is_not_met_and_under_it_is() -> None:
    at_most_2 = Bound(2, at_most=True, of_ratio=True)
    over = Row(2, "x", "", Spread(5, 5, 5, 1), Spread(2, 2, 2, 1), at_most_2)
    under = Row(2, "x", "", Spread(3, 3, 3, 1), Spread(2, 2, 2, 1), at_most_2)
    assert over.ratio == 2.5
    assert over.verdict == "not met"
    assert under.verdict == "met"
    at_least = Row(3, "x", "", Spread(4, 4, 4, 1), Spread(2, 2, 2, 1), Bound(2.5, False, True))
    assert at_least.verdict == "not met"


def test_a_ratio_without_its_baseline_is_not_measured_and_says_why() -> None:
    row = Row(1, "x", "", Spread(5, 5, 5, 1), None, Bound(0.5, True, True), "no base tree")
    assert row.verdict == "not measured: no base tree"


def test_chat_latency_is_judged_on_the_median_p99_and_loss_on_the_worst_run() -> None:
    fast = result("chat", "fanout", [chat(8, 40), chat(12, 60, lost=1), chat(9, 45)], 1000)
    rows = rows_of(1, target_rows([fast], {}, chat_rate=1000))
    ack, reply, lost = rows[:3]
    assert ack.value == Spread(9, 8, 12, 3)
    assert ack.verdict == "met"
    assert reply.verdict == "met"
    assert lost.value is not None and lost.value.median == 1
    assert lost.verdict == "not met"
    slow = result("chat", "fanout", [chat(11, 40)], 1000)
    assert rows_of(1, target_rows([slow], {}, chat_rate=1000))[0].verdict == "not met"


def test_cpu_per_chat_counts_nodes_workers_redis_and_postgres_against_the_base_tree() -> None:
    assert chat_cpu_ms(chat(1, 1)) == pytest.approx(
        {
            "nodes+workers": 1.0,
            "Redis": 0.5,
            "Postgres": 0.25,
            "generator": 0.75,
            "other": 0.1,
            "system": 1.75,
        }
    )
    ours = [result("chat", "fanout", [chat(1, 1, cores=1.0)], r) for r in (200, 1000)]
    rows = rows_of(1, target_rows(ours, {}, chat_rate=1000))
    assert [r.verdict for r in rows[3:]] == ["not measured: no base tree given (--base-tree)"] * 2
    half = [result("chat", "fanout", [chat(1, 1, cores=3.5)], r) for r in (200, 1000)]
    twice = [result("chat", "fanout", [chat(1, 1, cores=2.0)], r) for r in (200, 1000)]
    # 1.75 against 4.25 ms: met; against 2.75 ms: not met.
    assert [r.verdict for r in rows_of(1, target_rows(ours, {}, 1000, half))[3:]] == ["met"] * 2
    rows = rows_of(1, target_rows(ours, {}, 1000, twice))[3:]
    assert [r.verdict for r in rows] == ["not met"] * 2
    assert "Postgres 0.25" in rows[0].what


def test_a_skipped_scenario_is_not_measured_with_its_reason() -> None:
    skipped = Result(Spec("fanout", 2, "user"), Scenario("chat", 1000), [], ["skipped: budget"])
    rows = rows_of(1, target_rows([skipped], {}, chat_rate=1000))
    assert rows[0].verdict == "not measured: chat @ 1,000/s: skipped: budget"
    assert "not run" in rows_of(3, target_rows([], {}, 1000))[0].verdict


def test_fanout_rows_against_the_forwarder() -> None:
    def delivery(per_s: float, per_cpu: float, p99: float, redis: float = 0.1) -> dict[str, Any]:
        return {
            "deliveries_per_s": per_s,
            "servers": {"deliveries_per_cpu_s": per_cpu},
            "latency_ms": {"p99": p99},
            "loadtest": {"redis_cpu_cores": redis},
        }

    results = [
        result("max", "fanout", [delivery(90_000, 60_000, 5)]),
        result("max", "baseline", [delivery(100_000, 20_000, 5)]),
        result("max", "fanout", [delivery(110_000, 50_000, 5)], nodes=4),
        result("rate", "fanout", [delivery(4000, 0, 2.0, redis=0.16)], 4000),
        result("rate", "baseline", [delivery(4000, 0, 2.5, redis=0.08)], 4000),
        result("rate", "fanout", [delivery(10_000, 0, 3.0, redis=0.25)], 10_000),
        result("rate", "baseline", [delivery(10_000, 0, 2.5, redis=0.1)], 10_000),
    ]
    redis = {"rate": 20_000, "runs": {"publish": [{"us_per_delivery": 2.0}], "this": []}}
    rows = target_rows(results, {"redis": redis}, 1000)
    per_delivery, redis_4k, redis_10k, maximum = rows_of(2, rows)
    assert per_delivery.verdict.startswith("not measured")
    # Redis' CPU over the window per delivery: 0.16 cores at 4,000/s = 40 µs, twice the
    # forwarder's 20 (met: ≤ 2×); at 10,000/s 25 µs against 10 (2.5×: not met).
    assert redis_4k.value is not None and redis_4k.value.median == pytest.approx(40)
    assert redis_4k.ratio == pytest.approx(2.0) and redis_4k.verdict == "met"
    assert redis_10k.ratio == pytest.approx(2.5) and redis_10k.verdict == "not met"
    assert maximum.value is not None and maximum.value.median == 110_000  # best node count
    assert maximum.verdict == "met"
    per_cpu, at_4k, at_10k = rows_of(3, rows)
    assert per_cpu.ratio == 3.0 and per_cpu.verdict == "met"
    assert at_4k.verdict == "met"
    assert at_10k.verdict == "not met"
    redis["runs"]["this"] = [{"us_per_delivery": 5.0}, {"us_per_delivery": 3.0}]
    per_delivery = rows_of(2, target_rows(results, {"redis": redis}, 1000))[0]
    assert per_delivery.ratio == 2.0 and per_delivery.verdict == "met"


def test_idle_cores_are_per_node_per_10000_connections() -> None:
    report = {
        "connections": {"made": 2000},
        "servers": {"pids": [1, 2], "cpu_cores": 0.004, "rss_per_connection_kib": 3.9},
    }
    # 0.002 cores per node holding 1,000: 0.02 per 10,000.
    assert idle_cores_per_10k(report) == pytest.approx(0.02)
    idle = [result("idle", "fanout", [report], nodes=1)]
    rss, cores = rows_of(4, target_rows(idle, {}, 1000))
    assert rss.verdict == "met"
    assert cores.verdict == "not met"


def test_side_benches_handover_and_assistant() -> None:
    def run(p50: float, p99: float, top: float) -> dict[str, Any]:
        return {"chat": {"reply_ms": {"p50": p50, "p99": p99, "max": top}}}

    handover = {"rate": 500, "runs": {"this": [run(5, 300, 600), run(5, 200, 400)]}}
    assistant = {
        "runs": {"echo": [run(10, 100, 0)], "openai+hooks": [run(10.5, 115, 0)]},
    }
    rows = target_rows([], {"handover": handover, "assistant": assistant}, 1000)
    p99, top = rows_of(5, rows)
    assert p99.verdict == "met"
    assert top.value == Spread(500, 400, 600, 2)
    assert top.verdict == "met"
    p50, p99 = rows_of(6, rows)
    assert p50.verdict == "met"
    assert p99.verdict == "not met"  # 1.15× echo
    failed = target_rows([], {"handover": "failed: boom"}, 1000)
    assert rows_of(5, failed)[0].verdict == "not measured: handover side bench: failed: boom"


def test_render_prints_one_line_per_row() -> None:
    rows = target_rows([], {}, 1000)
    text = render(rows)
    assert len(text.splitlines()) == len(rows) + 2
    assert {r.target for r in rows} == {1, 2, 3, 4, 5, 6}
