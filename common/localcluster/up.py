"""`fanout up`: a whole local cluster (nodes, workers, Redis, Postgres) in one command.

Redis and Postgres are used where they answer, else started embedded (common.localcluster.embedded).
Each node and worker is a child process in its own session, logging to
<data dir>/logs/<name>.log. Ctrl-C or SIGTERM drains them (SIGTERM, then SIGKILL after
the drain timeout + 5 s), then stops the embedded services; a second Ctrl-C stops waiting.
A child that dies on its own is reported and not restarted: a crash should be seen, not
hidden behind a restart loop. When every child has died, `fanout up` stops with exit 1.
"""

from __future__ import annotations

import http.client
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen
from types import FrameType
from urllib.parse import urlsplit

import asyncpg

from common.auth import mint_token
from common.config import ConfigError, Settings
from common.localcluster import devinfo
from common.localcluster.embedded import EmbeddedError, Services, last_log_line, local_services
from common.localcluster.processes import spawn
from common.store.schema import migrate_sync

MAX_PROCESSES = 32
WORKER_PORT_OFFSET = 100
READY_TIMEOUT = 30.0
KILL_MARGIN = 5.0
TOKEN_USER = "alice"
ADMIN_USER = "admin"
TOKEN_TTL = 86400


class StartupError(RuntimeError):
    """The cluster could not start; the message is one line for the user."""


@dataclass(slots=True)
class Child:
    """One node or worker process of the local cluster."""

    name: str
    port: int
    proc: Popen[bytes]
    log: Path
    reported: bool = False

    def ended(self, when: str) -> str:
        """How the process ended, with the last line of its log, for a one-line message."""
        code = self.proc.returncode
        how = (
            f"was killed by {signal.Signals(-code).name}"
            if code and code < 0
            else f"exited with code {code}"
        )
        return f"{self.name} {how}{when}: {last_log_line(self.log)} (log: {self.log})"


def main(settings: Settings, *, nodes: int, workers: int, port: int, data_dir: str | None) -> None:
    """Run a local cluster until Ctrl-C or SIGTERM (SPEC §3, `fanout up`)."""
    _check_count("--nodes", nodes)
    _check_count("--workers", workers)
    if port + WORKER_PORT_OFFSET + workers - 1 > 65535:
        raise ConfigError(
            f"--port {port} leaves no room for worker ports "
            f"{port + WORKER_PORT_OFFSET}..; use a lower one"
        )
    folder = devinfo.data_dir(data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    secret = None if settings.jwt_secret or settings.jwt_public_key else devinfo.dev_secret(folder)
    with _stop_signals_interrupt():
        try:
            with local_services(
                folder, redis_url=settings.redis_url, database_url=settings.database_url
            ) as services:
                _migrate(services.database_url)
                _run_cluster(settings, services, folder, nodes, workers, port, secret)
        except KeyboardInterrupt:
            print("fanout up: stopped", flush=True)
        except (EmbeddedError, StartupError) as exc:
            print(f"fanout up: {exc}", file=sys.stderr, flush=True)
            sys.exit(1)


def _check_count(flag: str, value: int) -> None:
    if not 1 <= value <= MAX_PROCESSES:
        raise ConfigError(f"{flag} must be between 1 and {MAX_PROCESSES}, got {value}")


@contextmanager
def _stop_signals_interrupt() -> Iterator[None]:
    # SIGTERM stops like Ctrl-C. Set explicitly: a shell without job control starts
    # background commands with SIGINT ignored.
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, signal.default_int_handler)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if handler is not None:  # None: set outside Python, cannot be restored
                signal.signal(sig, handler)


def _migrate(database_url: str) -> None:
    try:
        migrate_sync(database_url)
    except (OSError, asyncpg.PostgresError) as exc:
        raise StartupError(f"migrating {_where(database_url)} failed: {exc}") from None


def _child_env(services: Services, dev_secret: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        FANOUT_REDIS_URL=services.redis_url,
        FANOUT_DATABASE_URL=services.database_url,
        PYTHONUNBUFFERED="1",
    )
    if dev_secret:
        env["FANOUT_JWT_SECRET"] = dev_secret
    return env


def _run_cluster(
    settings: Settings,
    services: Services,
    folder: Path,
    nodes: int,
    workers: int,
    port: int,
    dev_secret: str | None,
) -> None:
    env = _child_env(services, dev_secret)
    children: list[Child] = []
    try:
        for i in range(nodes):
            children.append(_start(f"node-{i + 1}", "node", port + i, env, folder))
        for j in range(workers):
            children.append(
                _start(f"worker-{j + 1}", "worker", port + WORKER_PORT_OFFSET + j, env, folder)
            )
        _wait_ready(children)
        ws_urls = tuple(
            f"ws://127.0.0.1:{c.port}/ws" for c in children if c.name.startswith("node-")
        )
        running = devinfo.LocalCluster(os.getpid(), ws_urls, services.redis_url, settings.namespace)
        with devinfo.recorded(folder, running):
            print(_banner(settings, children, services, folder, dev_secret), flush=True)
            _watch(children)
    finally:
        _stop_children(children, settings.drain_timeout + KILL_MARGIN)


def _start(name: str, command: str, port: int, env: dict[str, str], folder: Path) -> Child:
    log = folder / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "common.cli", command, "--port", str(port)]
    proc = spawn(args, log_path=log, env={**env, "FANOUT_NODE_ID": name})
    return Child(name, port, proc, log)


def _wait_ready(children: list[Child]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    waiting = list(children)
    while waiting:
        for child in list(waiting):
            if child.proc.poll() is not None:
                raise StartupError(child.ended(" during start"))
            if _ready(child.port):
                waiting.remove(child)
        if waiting and time.monotonic() > deadline:
            names = ", ".join(c.name for c in waiting)
            raise StartupError(
                f"{names} not ready after {READY_TIMEOUT:.0f} s (logs: {waiting[0].log.parent})"
            )
        if waiting:
            time.sleep(0.1)


def _ready(port: int) -> bool:
    # http.client, not urllib: urllib would honour an http_proxy meant for the internet.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/readyz")
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def _watch(children: list[Child]) -> None:
    while True:
        time.sleep(0.5)
        for child in children:
            if child.proc.poll() is not None and not child.reported:
                child.reported = True
                print(
                    f"fanout up: {child.ended(', not restarted')}",
                    file=sys.stderr,
                    flush=True,
                )
        if all(child.reported for child in children):
            raise StartupError("every node and worker has exited; stopping")


def _stop_children(children: list[Child], grace: float) -> None:
    live = [c for c in children if c.proc.poll() is None]
    with _hurry_on_signal() as hurried:
        if live:
            print(
                f"fanout up: stopping {', '.join(c.name for c in live)} (up to {grace:.0f} s; "
                "Ctrl-C again to kill them)",
                flush=True,
            )
        _signal_all(live, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(c.proc.poll() is None for c in live) and time.monotonic() < deadline:
            if hurried():
                break
            time.sleep(0.1)
        _signal_all(live, signal.SIGKILL)
        for child in live:
            child.proc.wait()


def _signal_all(children: list[Child], sig: int) -> None:
    for child in children:
        # Only while unreaped: then its process group id cannot have been reused.
        if child.proc.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(child.proc.pid, sig)


@contextmanager
def _hurry_on_signal() -> Iterator[Callable[[], bool]]:
    # While stopping, Ctrl-C or SIGTERM must not abort the cleanup half-way: it only
    # shortens the wait. The embedded services stop after this, still uninterrupted.
    hurried = False

    def hurry(signum: int, frame: FrameType | None) -> None:
        nonlocal hurried
        hurried = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, hurry)
    yield lambda: hurried


def _banner(
    settings: Settings,
    children: list[Child],
    services: Services,
    folder: Path,
    dev_secret: str | None,
) -> str:
    """What is running, and commands that work as printed (tests/deploy/test_up.py runs them)."""
    nodes = [c for c in children if c.name.startswith("node-")]
    workers = [c for c in children if c.name.startswith("worker-")]

    def origin(name: str, url: str) -> str:
        how = "embedded" if name in services.started else "existing"
        return f"{name.capitalize()} {how} at {_where(url)}"

    first = f"http://127.0.0.1:{nodes[0].port}"
    lines = [
        f"fanout up: ready - {len(nodes)} node(s), {len(workers)} worker(s); "
        f"{origin('redis', services.redis_url)}, "
        f"{origin('postgres', services.database_url)}"
    ]
    for c in nodes:
        lines.append(f"  {c.name:<10} http://127.0.0.1:{c.port}  ws://127.0.0.1:{c.port}/ws")
    for c in workers:
        lines.append(f"  {c.name:<10} http://127.0.0.1:{c.port}/readyz")
    secret = dev_secret or settings.jwt_secret
    if secret is None:
        lines.append(f"  dashboard  {first}/dashboard  (sign in with an admin token of your key)")
        lines.append("  tokens: sign them with the private key of FANOUT_JWT_PUBLIC_KEY")
    else:

        def token(user: str, roles: list[str]) -> str:
            return mint_token(
                secret,
                user,
                roles=roles,
                ttl=TOKEN_TTL,
                audience=settings.jwt_audience,
                issuer=settings.jwt_issuer,
            )

        cli = settings.cli_name
        # The demo page moves between these when one goes (the client's `urls`).
        every_node = ",".join(f"http://127.0.0.1:{c.port}" for c in nodes)
        # Where token and loadtest find this cluster: say so unless it is their default.
        here = "" if folder == devinfo.data_dir(None) else f" --data-dir {folder}"
        lines += [
            f"  dashboard  {first}/dashboard#token={token(ADMIN_USER, ['admin'])}",
            f"  demo chat  {first}/demo#token={token(TOKEN_USER, [])}&nodes={every_node}",
            f"  token for {TOKEN_USER} (24 h), then a session, another user's token, some load:",
            f"    export TOKEN={token(TOKEN_USER, [])}",
            '    curl -X POST -H "Authorization: Bearer $TOKEN" '
            f"-d '{{\"participants\": []}}' {first}/api/v1/sessions",
            f"    {cli} token bob{here}   # --role admin|agent for those roles",
            f"    {cli} loadtest --connections 100 --duration 5{here}"
            f"   # over all {len(nodes)} node(s)",
        ]
    lines.append(f"  logs: {folder / 'logs'}   Ctrl-C stops everything")
    return "\n".join(lines)


def _where(url: str) -> str:
    # host:port only: a URL may carry a password.
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)
