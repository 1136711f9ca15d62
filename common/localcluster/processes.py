"""Child processes of `fanout up` and the tests: start, watch, stop, and name errors."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import SplitResult

log = logging.getLogger("fanout.embedded")

T = TypeVar("T")

START_TIMEOUT = 60.0
_PR_SET_PDEATHSIG = 1


class EmbeddedError(RuntimeError):
    """A service does not answer and cannot be started here; the message is one line."""


@dataclass(frozen=True, slots=True)
class Account:
    """The unprivileged OS account Postgres runs as when we are root."""

    uid: int
    gid: int
    groups: tuple[int, ...]


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    # Called from async code: asyncio.run needs a thread without a running loop.
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def local_address(parts: SplitResult, name: str, default_port: int) -> tuple[str, int]:
    host, port = parts.hostname, parts.port or default_port
    if not host or parts.scheme == "unix":
        raise EmbeddedError(
            f"{name} does not answer at {parts.geturl()!r}; an embedded one "
            "needs a TCP loopback URL such as 127.0.0.1"
        )
    if host != "localhost" and not is_loopback_ip(host):
        raise EmbeddedError(
            f"{name} does not answer at {host}:{port}, which is not this "
            "machine, so no embedded one can stand in: start it or fix the URL"
        )
    return ("127.0.0.1" if host == "localhost" else host), port


def is_loopback_ip(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def log_file(data_dir: Path, name: str) -> Path:
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


def spawn(
    args: Sequence[str | Path],
    *,
    log_path: Path,
    env: dict[str, str] | None = None,
    death_signal: int = signal.SIGTERM,
    account: Account | None = None,
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
            preexec_fn=parent_death_signal(death_signal),
            **as_account,
        )


def flags(options: dict[str, object], prefix: str = "--") -> list[str]:
    return [arg for name, value in options.items() for arg in (prefix + name, str(value))]


def parent_death_signal(sig: int) -> Callable[[], None] | None:
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


def wait_until_answers(
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
