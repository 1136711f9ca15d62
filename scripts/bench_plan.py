"""What scripts/bench.py measures: scenarios, the clusters they run on, and their results."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Scenario:
    kind: str  # "max", "rate", "idle", "chat"
    rate: float = 0.0
    connections: int = 1000
    duration: float = 6.0
    runs: int = 3
    processes: int = 2  # load generator processes (one tops out near one core)
    settle: float = 3.0

    @property
    def label(self) -> str:
        if self.kind == "rate":
            return f"fanout @ {self.rate:,.0f}/s"
        if self.kind == "chat":
            return f"chat @ {self.rate:,.0f}/s"
        if self.kind == "idle":
            return f"idle {self.connections:,}"
        return "fanout max"


@dataclass(frozen=True)
class Spec:
    system: str  # "fanout" or "baseline"
    nodes: int
    mode: str = "user"
    scenarios: tuple[Scenario, ...] = ()

    @property
    def name(self) -> str:
        mode = f" {self.mode}" if self.system == "fanout" else ""
        return f"{self.system}{mode} x{self.nodes}"


@dataclass
class Result:
    spec: Spec
    scenario: Scenario
    reports: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def plan(args: argparse.Namespace) -> list[Spec]:
    runs, quick, conns = args.runs, args.quick, args.connections
    d_max, d_rate = (3.0, 4.0) if quick else (6.0, 10.0)
    # Idle CPU is read in clock ticks (10 ms): a window long enough that target 4's 0.01
    # cores per 10,000 connections on a node is many ticks.
    d_idle = 10.0 if quick else 20.0
    idle = Scenario("idle", connections=args.idle_connections, duration=d_idle, runs=runs)
    mx = Scenario("max", connections=conns, duration=d_max, runs=runs)
    fixed = (
        Scenario("rate", rate=4000, connections=conns, duration=d_rate, runs=runs, processes=1),
        Scenario("rate", rate=10000, connections=conns, duration=d_rate, runs=runs),
    )
    # A rate the workers sustain (latency), and the target rate (capacity: the workers
    # fall behind and drain in the settle time; "completed/s" shows what they managed).
    chats = (
        Scenario("chat", 200, conns, d_rate, runs, processes=1, settle=10),
        Scenario("chat", args.chat_rate, conns, d_max, runs, processes=1, settle=40),
    )
    # Idle on clusters of its own: fresh processes give a clean RSS baseline, and closing
    # 10,000 sockets keeps a node busy for a while after the run. One node holds them
    # all: target 4 is per 10,000 connections on a node, and a node's fixed cost (stats,
    # keepalives) would count twice scaled from two nodes of 5,000.
    specs = [Spec("fanout", 1, "user", (idle,)), Spec("baseline", 1, "-", (idle,))]
    specs.append(Spec("fanout", 2, "user", (mx, *fixed, *chats)))
    specs.append(Spec("baseline", 2, "-", (mx, *fixed)))
    specs.append(Spec("fanout", 2, "pattern", (mx,)))
    for n in (1, 4):
        specs += [Spec("fanout", n, "user", (mx,)), Spec("fanout", n, "pattern", (mx,))]
        specs.append(Spec("baseline", n, "-", (mx,)))
    return specs
