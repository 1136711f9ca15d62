"""Capped exponential back-off with full jitter: how every retry loop paces itself.

The ceiling doubles from `first` after each failure up to `cap`; each delay is drawn
uniformly between 0 and the ceiling ("full jitter"). Many clients that lost the same
server in the same millisecond (a node dying, Redis restarting) so come back spread
over the whole window instead of in waves at its middle, and the expected wait is
half the ceiling. `reset()` after a success starts again from `first`.
"""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    """The delays before successive retries of one activity (not shared between tasks)."""

    def __init__(
        self, *, first: float, cap: float, rand: Callable[[], float] = random.random
    ) -> None:
        """`rand` draws from [0, 1); a test passes its own to make delays exact.

        `first` 0 retries at once every time (a setting that turns the wait off)."""
        if not 0 <= first <= cap:
            raise ValueError(f"back-off needs 0 <= first <= cap (got {first}, {cap})")
        self._first = first
        self._cap = cap
        self._rand = rand
        self._ceiling = first

    @property
    def ceiling(self) -> float:
        """The longest the next delay can be."""
        return self._ceiling

    def next_delay(self) -> float:
        """The delay before the next retry; the ceiling doubles for the one after."""
        delay = self._ceiling * self._rand()
        self._ceiling = min(self._ceiling * 2, self._cap)
        return delay

    def reset(self) -> None:
        """After a success: the next failure waits at most `first` again."""
        self._ceiling = self._first
