"""The benchmark scripts' processes: a cluster of nodes (fanout or baseline) and workers, one
`fanout loadtest` run against it, and the clean-up of a run's Redis keys and database; and the
pieces of those other scripts start their own processes with (spawn, wait_listening,
stop_process_groups)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import redis
from bench_plan import Scenario, Spec

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 30.0
# Before a run, wait up to QUIET_WAIT s for the machine to be this idle (busy cores,
# over one second): a shared machine's other jobs land in the latency tail otherwise.
QUIET_CORES = 0.3
QUIET_WAIT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def spawn(
    args: list[str], env: dict[str, str], log_path: Path, cwd: Path | str = ROOT
) -> subprocess.Popen[bytes]:
    """`python ARGS` in a process group of its own (stop_process_groups ends it), `env` over
    this process' environment, its output appended to `log_path`."""
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, *args],
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
        )


def wait_listening(
    nodes: Iterable[tuple[subprocess.Popen[bytes], int]], failure: str, timeout: float
) -> None:
    """Until every node listens on its port; RuntimeError(failure) when one exits first or
    `timeout` s pass."""
    deadline = time.monotonic() + timeout
    for proc, port in nodes:
        while not _listening(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(failure)
            time.sleep(0.1)


def stop_process_groups(procs: Iterable[subprocess.Popen[bytes]], timeout: float) -> None:
    """SIGTERM to each process group still running; SIGKILL to any not gone `timeout` s later."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        with suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.1, deadline - time.monotonic()))
        if proc.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class Cluster:
    """Nodes (fanout or baseline) and workers of one spec; stopped on exit. With
    `worker_tree`, the workers run that tree's code (its directory as their cwd); with
    `node_tree`, the fanout nodes do."""

    def __init__(
        self,
        spec: Spec,
        env: dict[str, str],
        logs: Path,
        worker_tree: Path | None = None,
        node_tree: Path | None = None,
    ) -> None:
        self.spec, self.env, self.logs, self.worker_tree = spec, env, logs, worker_tree
        self.node_tree = node_tree if spec.system == "fanout" else None
        self.nodes: list[tuple[subprocess.Popen[bytes], int]] = []
        self.workers: list[subprocess.Popen[bytes]] = []

    def _spawn(self, name: str, args: list[str], extra: dict[str, str]) -> subprocess.Popen[bytes]:
        env = {**self.env, **extra, "FANOUT_NODE_ID": name}
        tree = self.worker_tree if name.startswith("worker") else self.node_tree
        if tree is not None:
            return spawn(args, env, self.logs / f"{name}-tree.log", cwd=tree)
        return spawn(args, env, self.logs / f"{name}.log")

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
        failure = f"{self.spec.name}: a node did not start (logs: {self.logs})"
        wait_listening(self.nodes, failure, READY_TIMEOUT)
        time.sleep(0.5)  # workers take their partition leases meanwhile

    @property
    def urls(self) -> list[str]:
        return [f"ws://127.0.0.1:{port}/ws" for _, port in self.nodes]

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc, _ in self.nodes]

    def stop(self) -> None:
        stop_process_groups([p for p, _ in self.nodes] + self.workers, timeout=8)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def running(
    spec: Spec,
    env: dict[str, str],
    logs: Path,
    worker_tree: Path | None = None,
    node_tree: Path | None = None,
) -> Iterator[Cluster]:
    cluster = Cluster(spec, env, logs, worker_tree, node_tree)
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
    return run_loadtest(args[1:], env, timeout=scenario.duration + scenario.settle + 180)


def run_loadtest(
    args: list[str], env: dict[str, str], *, timeout: float, cwd: Path | str = ROOT
) -> dict[str, Any]:
    """`python ARGS` (a `fanout loadtest --json` command line), `env` over this process'
    environment; its JSON report, or RuntimeError with the end of what it printed."""
    done = subprocess.run(
        [sys.executable, *args],
        env={**os.environ, **env},
        cwd=cwd,
        capture_output=True,
        timeout=timeout,
        check=False,
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
