"""Garbage-collector pauses: kept short, and measured.

A node or worker holds tens of thousands of long-lived objects from start-up
(modules, the app, pools); every full collection walked them all again: 40-50 ms
with the loop stopped, seen in the p99 of deliveries. After start-up they are moved
out of the collector's reach (`gc.freeze`), so a full collection walks only what
the process made since. The sockets' own objects still make a full collection long
(≈50-115 ms at 500 connections per node, measured), so full collections are also
made ten times rarer: cyclic garbage lives a little longer instead. `GcPauses`
times every collection, for the stats (`gc_pause_ms`).
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

log = logging.getLogger("fanout.gc")

# A pause this long is logged: it delays every frame of the process.
SLOW_MS = 50.0


# The third threshold: collections of the middle generation between two full ones
# (CPython's default is 10).
FULL_EVERY = 100


def freeze_startup_objects() -> None:
    """Collect once, exempt everything alive now from later collections, and make full
    collections rarer."""
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_EVERY)


class GcPauses:
    """Times the collector's pauses; `take()` returns the longest since the last take."""

    def __init__(self) -> None:
        self._started = 0.0
        self._longest = 0.0
        self.collections = 0

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._on_gc)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def take(self) -> float:
        """The longest pause in ms since the last call."""
        longest, self._longest = self._longest, 0.0
        return round(longest, 1)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = (time.perf_counter() - self._started) * 1000
        self.collections += 1
        self._longest = max(self._longest, pause)
        if pause >= SLOW_MS:
            log.warning("gc: generation %d took %.0f ms", info["generation"], pause)
