"""Process plumbing shared by nodes and workers: logging, uvloop, signals."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Coroutine
from typing import Any


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # aiohttp logs every request at INFO; the token may be in a query string.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


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
