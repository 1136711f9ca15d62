"""The README benchmark table in one command: local clusters, `fanout loadtest`, a baseline.

    .venv/bin/python scripts/bench.py            # full run, about 10 minutes
    .venv/bin/python scripts/bench.py --quick    # one short run of each, about 2 minutes

It starts each cluster itself on this machine (nodes, 2 workers for fanout), in a
Redis namespace and a Postgres database of its own (the services at the default
addresses, or embedded ones: common/embedded.py), and drives it with `fanout
loadtest` (500 users x 2 devices, 64-byte payloads by default):

- fanout at the maximum rate, `user` and `pattern` subscription modes, 1, 2 and 4 nodes,
  and the baseline forwarder (scripts/baseline_forwarder.py) at the same node counts;
- fanout and the baseline on 2 nodes at fixed 4,000 and 10,000 deliveries/s (latency);
- idle: 10,000 connections on 2 nodes, node RSS per connection (from /proc);
- chat on 2 nodes + 2 workers at a fixed rate (send -> ack, send -> reply on all devices).

Node CPU comes from /proc/PID/stat over each measured window. Every figure is the
median of `--runs` runs; ratios compare fanout with the baseline from the same run
of this script. Raw reports go to `--out` as JSON. A `--budget` bounds the whole run:
scenarios that would start after it are skipped and listed as such.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import resource
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.embedded import local_services  # noqa: E402
from common.schema import migrate_sync  # noqa: E402

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
DEFAULT_POSTGRES = "postgresql://127.0.0.1:5432/postgres"
READY_TIMEOUT = 30.0
FD_LIMIT = 30_000
# Before a run, wait up to QUIET_WAIT s for the machine to be this idle (busy cores,
# over one second): a shared machine's other jobs land in the latency tail otherwise.
QUIET_CORES = 0.3
QUIET_WAIT = 30.0


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
    idle = Scenario("idle", connections=args.idle_connections, duration=3.0, runs=1)
    mx = Scenario("max", connections=conns, duration=d_max, runs=runs)
    fixed = (
        Scenario("rate", rate=4000, connections=conns, duration=d_rate, runs=runs, processes=1),
        Scenario("rate", rate=10000, connections=conns, duration=d_rate, runs=runs),
    )
    # A rate the workers sustain (latency), and the target rate (capacity: the workers
    # fall behind and drain in the settle time; "completed/s" shows what they managed).
    chats = (
        Scenario("chat", 200, conns, d_rate, runs, processes=1, settle=10),
        Scenario("chat", args.chat_rate, conns, d_max, 1, processes=1, settle=40),
    )
    # Idle on clusters of its own: fresh processes give a clean RSS baseline, and closing
    # 10,000 sockets keeps a node busy for a while after the run.
    specs = [Spec("fanout", 2, "user", (idle,)), Spec("baseline", 2, "-", (idle,))]
    specs.append(Spec("fanout", 2, "user", (mx, *fixed, *chats)))
    specs.append(Spec("baseline", 2, "-", (mx, *fixed)))
    specs.append(Spec("fanout", 2, "pattern", (mx,)))
    for n in (1, 4):
        specs += [Spec("fanout", n, "user", (mx,)), Spec("fanout", n, "pattern", (mx,))]
        specs.append(Spec("baseline", n, "-", (mx,)))
    return specs


# -- processes ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Cluster:
    """Nodes (fanout or baseline) and workers of one spec; stopped on exit."""

    def __init__(self, spec: Spec, env: dict[str, str], logs: Path) -> None:
        self.spec, self.env, self.logs = spec, env, logs
        self.nodes: list[tuple[subprocess.Popen[bytes], int]] = []
        self.workers: list[subprocess.Popen[bytes]] = []

    def _spawn(self, name: str, args: list[str], extra: dict[str, str]) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("ab") as log:
            return subprocess.Popen(
                [sys.executable, *args],
                env={**os.environ, **self.env, **extra, "FANOUT_NODE_ID": name},
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                start_new_session=True,
            )

    def start(self) -> None:
        spec = self.spec
        for i in range(spec.nodes):
            port = free_port()
            if spec.system == "baseline":
                args = ["scripts/baseline_forwarder.py", "--port", str(port)]
            else:
                args = ["-m", "common.cli", "node", "--port", str(port)]
            extra = {"FANOUT_SUBSCRIPTION_MODE": spec.mode} if spec.system == "fanout" else {}
            self.nodes.append((self._spawn(f"{spec.system}-node-{i + 1}", args, extra), port))
        if spec.system == "fanout":
            for j in range(2):
                args = ["-m", "common.cli", "worker", "--port", str(free_port())]
                self.workers.append(self._spawn(f"worker-{j + 1}", args, {}))
        deadline = time.monotonic() + READY_TIMEOUT
        for proc, port in self.nodes:
            while not _listening(port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{self.spec.name}: a node did not start (logs: {self.logs})"
                    )
                time.sleep(0.1)
        time.sleep(0.5)  # workers take their partition leases meanwhile

    @property
    def urls(self) -> list[str]:
        return [f"ws://127.0.0.1:{port}/ws" for _, port in self.nodes]

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc, _ in self.nodes]

    def stop(self) -> None:
        procs = [p for p, _ in self.nodes] + self.workers
        for proc in procs:
            if proc.poll() is None:
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 8
        for proc in procs:
            with suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.1, deadline - time.monotonic()))
            if proc.poll() is None:
                with suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def running(spec: Spec, env: dict[str, str], logs: Path) -> Iterator[Cluster]:
    cluster = Cluster(spec, env, logs)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def busy_cores(over: float = 1.0) -> float:
    """Cores the whole machine kept busy over the next `over` seconds (/proc/stat)."""

    def busy_and_total() -> tuple[int, int]:
        fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return sum(fields) - fields[3] - fields[4], sum(fields)

    b0, t0 = busy_and_total()
    time.sleep(over)
    b1, t1 = busy_and_total()
    return (b1 - b0) / max(1, t1 - t0) * (os.cpu_count() or 1)


def wait_for_quiet() -> None:
    """Give other jobs on the machine up to QUIET_WAIT s to go quiet; go on regardless."""
    deadline = time.monotonic() + QUIET_WAIT
    while (busy := busy_cores()) > QUIET_CORES and time.monotonic() < deadline:
        pass
    if busy > QUIET_CORES:
        print(f"bench:   the machine is busy ({busy:.1f} cores); measuring anyway", file=sys.stderr)


def loadtest(cluster: Cluster, scenario: Scenario, env: dict[str, str]) -> dict[str, Any]:
    """One `fanout loadtest --json` run against the cluster; its report."""
    if scenario.kind == "rate":
        wait_for_quiet()
    pids = cluster.pids + ([w.pid for w in cluster.workers] if scenario.kind == "chat" else [])
    args = [sys.executable, "-m", "common.cli", "loadtest", "--json", "--quiet"]
    args += [a for url in cluster.urls for a in ("--url", url)]
    args += [a for pid in pids for a in ("--server-pid", str(pid))]
    mode = {"max": "fanout", "rate": "fanout"}.get(scenario.kind, scenario.kind)
    args += ["--mode", mode, "--connections", str(scenario.connections)]
    args += ["--duration", str(scenario.duration), "--rate", str(scenario.rate)]
    args += ["--processes", str(scenario.processes), "--settle", str(scenario.settle)]
    limit = scenario.duration + scenario.settle + 180
    done = subprocess.run(
        args, env={**os.environ, **env}, cwd=ROOT, capture_output=True, timeout=limit, check=False
    )
    if not done.stdout.strip():
        raise RuntimeError(f"loadtest exited {done.returncode}: {done.stderr.decode()[-500:]}")
    report: dict[str, Any] = orjson.loads(done.stdout)
    return report


def clear_namespace(redis_url: str, namespace: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{namespace}*", count=2000):
            batch.append(key)
            if len(batch) >= 1000:
                client.delete(*batch)
                batch.clear()
        if batch:
            client.delete(*batch)
    finally:
        client.close()


async def drop_database(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


# -- the table ------------------------------------------------------------------------------


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
    out = table(delivery, DELIVERY)
    out += ["", "Ratios, fanout ÷ baseline from the same run (p99: lower is better):", ""]
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
    return "\n".join(out)


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


# -- main -------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one short run of each scenario")
    parser.add_argument("--runs", type=int, default=None, help="runs per scenario (default 3)")
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--idle-connections", type=int, default=None, help="default 10000")
    parser.add_argument("--chat-rate", type=float, default=None, help="chats/s (default 1000)")
    parser.add_argument("--budget", type=float, default=None, help="seconds (default 660)")
    parser.add_argument("--only", default=None, help="run specs whose name contains this")
    parser.add_argument("--out", type=Path, default=None, help="raw reports (JSON)")
    args = parser.parse_args()
    args.runs = args.runs or (1 if args.quick else 3)
    args.idle_connections = args.idle_connections or (2000 if args.quick else 10_000)
    args.chat_rate = args.chat_rate or (300.0 if args.quick else 1000.0)
    budget = args.budget or (200.0 if args.quick else 660.0)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, FD_LIMIT)), hard))

    specs = [s for s in plan(args) if args.only is None or args.only in s.name]
    run_id = secrets.token_hex(4)
    data = ROOT / ".fanout-data" / "bench"
    started = time.monotonic()
    with local_services(data, redis_url=DEFAULT_REDIS, database_url=DEFAULT_POSTGRES) as svc:
        server = svc.database_url.rsplit("/", 1)[0]
        migrate_sync(f"{server}/fanout_bench_{run_id}")
        env = {
            "FANOUT_REDIS_URL": svc.redis_url,
            "FANOUT_DATABASE_URL": f"{server}/fanout_bench_{run_id}",
            "FANOUT_NAMESPACE": f"bench{run_id}:",
            "FANOUT_JWT_SECRET": secrets.token_urlsafe(32),
            "FANOUT_DRAIN_TIMEOUT": "3",
            "PYTHONUNBUFFERED": "1",
        }
        try:
            results = measure(specs, env, data / f"logs-{run_id}", started + budget)
        finally:
            clear_namespace(svc.redis_url, env["FANOUT_NAMESPACE"])
            asyncio.run(drop_database(f"{server}/postgres", f"fanout_bench_{run_id}"))
    out_path = args.out or data / f"results-{run_id}.json"
    raw = [
        {
            "spec": r.spec.name,
            "scenario": r.scenario.label,
            "reports": r.reports,
            "failures": r.failures,
        }
        for r in results
    ]
    out_path.write_bytes(orjson.dumps(raw, option=orjson.OPT_INDENT_2))
    print(f"\n{machine()}; {time.monotonic() - started:.0f} s; medians of up to {args.runs} runs.")
    print(f"Command: .venv/bin/python scripts/bench.py {' '.join(sys.argv[1:])}\n")
    print(tables(results))
    print(f"\nRaw reports: {out_path}")


def measure(specs: list[Spec], env: dict[str, str], logs: Path, deadline: float) -> list[Result]:
    """Each spec's cluster in turn, each of its scenarios `runs` times, until the deadline."""
    logs.mkdir(parents=True, exist_ok=True)
    results: list[Result] = []
    for spec in specs:
        pending = [Result(spec, s) for s in spec.scenarios]
        results += pending
        if time.monotonic() > deadline:
            for r in pending:
                r.failures.append("skipped: over the time budget")
            continue
        print(f"bench: {spec.name} ...", file=sys.stderr, flush=True)
        with running(spec, env, logs) as cluster:
            for result in pending:
                for _ in range(result.scenario.runs):
                    if time.monotonic() > deadline:
                        result.failures.append("skipped: over the time budget")
                        break
                    try:
                        report = loadtest(cluster, result.scenario, env)
                    except (RuntimeError, subprocess.TimeoutExpired) as exc:
                        result.failures.append(str(exc).splitlines()[-1][:200])
                        continue
                    result.reports.append(report)
                    _progress(result.scenario, report)
                    clear_namespace(env["FANOUT_REDIS_URL"], env["FANOUT_NAMESPACE"])
    return results


def _progress(scenario: Scenario, report: dict[str, Any]) -> None:
    servers = report.get("servers") or {}
    print(
        f"bench:   {scenario.label:<18} {report['deliveries_per_s']:>9,.0f}/s  "
        f"p99 {report['latency_ms'].get('p99', 0):>7.2f} ms  "
        f"node {servers.get('cpu_cores', 0):.2f} cores "
        f"({servers.get('deliveries_per_cpu_s') or 0:,.0f}/CPU-s)  lost {report['lost']}  "
        f"made {report['connections'].get('made')}",
        file=sys.stderr,
        flush=True,
    )


if __name__ == "__main__":
    main()
