"""Process plumbing shared by nodes and workers: uvloop, signals (logging: common/logs.py)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine
from typing import Any


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run a coroutine on uvloop where available."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        asyncio.run(main)
    else:
        uvloop.run(main)


def stop_event() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT: the start of a graceful drain."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def raise_if_cancelled() -> None:
    """Raise CancelledError if this task was cancelled and the cancellation got lost.

    A client library can swallow a cancellation that lands inside one of its calls
    (redis-py was seen to, during a SIGTERM); a loop that then sleeps on holds the
    process's stop until its watchdog. Loops call this after such calls.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
