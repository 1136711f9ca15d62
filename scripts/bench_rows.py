"""A measured figure beside its baseline for scripts/bench.py's targets section: the median
and range over the runs (Spread), what the target asks of it (Bound), the row with its
verdict, the reports a row is read from, and the rows as a Markdown table."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from bench_plan import Result


@dataclass(frozen=True)
class Spread:
    """A figure over the runs: median, lowest and highest."""

    median: float
    low: float
    high: float
    runs: int

    def text(self, spec: str) -> str:
        if self.runs < 2 or self.low == self.high:
            return format(self.median, spec)
        return f"{self.median:{spec}} ({self.low:{spec}}–{self.high:{spec}})"


def spread(values: Iterable[float | None]) -> Spread | None:
    found = sorted(v for v in values if v is not None)
    if not found:
        return None
    return Spread(statistics.median(found), found[0], found[-1], len(found))


@dataclass(frozen=True)
class Bound:
    """What the target asks of a value (or of the ratio to the baseline): at most or at
    least `limit`."""

    limit: float
    at_most: bool
    of_ratio: bool = False

    def holds(self, value: float) -> bool:
        return value <= self.limit if self.at_most else value >= self.limit

    def text(self, unit: str) -> str:
        sign = "≤" if self.at_most else "≥"
        if self.of_ratio:
            return f"{sign} {self.limit:g}× baseline"
        return f"{sign} {self.limit:g}{unit}"


@dataclass(frozen=True)
class Row:
    target: int
    what: str
    unit: str  # e.g. " ms"; the value's and the baseline's
    value: Spread | None
    baseline: Spread | None
    bound: Bound
    missing: str = ""  # why the value (or, for a ratio, the baseline) was not measured
    spec: str = ",.2f"

    @property
    def ratio(self) -> float | None:
        if self.value is None or self.baseline is None or not self.baseline.median:
            return None
        return self.value.median / self.baseline.median

    @property
    def verdict(self) -> str:
        if self.bound.of_ratio:
            checked = self.ratio
        else:
            checked = None if self.value is None else self.value.median
        if checked is None:
            return f"not measured: {self.missing or 'no value'}"
        return "met" if self.bound.holds(checked) else "not met"


# -- finding the measured reports ---------------------------------------------------------


def find(
    results: Sequence[Result], kind: str, system: str, nodes: int = 2, rate: float | None = None
) -> Result | None:
    """The result of a scenario on a cluster (fanout's `user` mode), if it was planned."""
    for r in results:
        if (
            r.scenario.kind == kind
            and r.spec.system == system
            and r.spec.nodes == nodes
            and (system != "fanout" or r.spec.mode == "user")
            and (rate is None or r.scenario.rate == rate)
        ):
            return r
    return None


def why_missing(result: Result | None, what: str) -> str:
    if result is None:
        return f"{what} not run (--kinds/--only)"
    if result.failures:
        return f"{what}: {result.failures[0]}"
    return f"{what}: no report"


def values(result: Result | None, *path: str) -> list[float | None]:
    if result is None:
        return []
    return [dig(report, *path) for report in result.reports]


def dig(document: Any, *path: str) -> float | None:
    for key in path:
        document = document.get(key) if isinstance(document, dict) else None
    return float(document) if isinstance(document, int | float) else None


def render(rows: Sequence[Row]) -> str:
    out = [
        "| target | measured | value | baseline | ratio | bound | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        value = "—" if row.value is None else row.value.text(row.spec) + row.unit
        base = "—" if row.baseline is None else row.baseline.text(row.spec) + row.unit
        ratio = "—" if row.ratio is None else f"{row.ratio:.2f}×"
        cells = [str(row.target), row.what, value, base, ratio, row.bound.text(row.unit)]
        out.append("| " + " | ".join([*cells, row.verdict]) + " |")
    return "\n".join(out)
