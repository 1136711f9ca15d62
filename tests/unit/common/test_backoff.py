"""The one back-off helper (common/backoff.py): capped exponential, full jitter, reset."""

from __future__ import annotations

import random

import pytest

from common.backoff import Backoff
from worker import outage


def test_the_ceiling_doubles_up_to_the_cap() -> None:
    backoff = Backoff(first=0.1, cap=1.0, rand=lambda: 1.0)
    delays = [backoff.next_delay() for _ in range(7)]
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])


def test_each_delay_is_drawn_from_zero_to_the_ceiling() -> None:
    draws = iter([0.0, 0.5, 0.25])
    backoff = Backoff(first=1.0, cap=8.0, rand=lambda: next(draws))
    assert [backoff.next_delay() for _ in range(3)] == [0.0, 1.0, 1.0]  # ceilings 1, 2, 4
    assert backoff.ceiling == 8.0


def test_full_jitter_spreads_retries_over_the_whole_window() -> None:
    backoff = Backoff(first=1.0, cap=1.0, rand=random.Random(7).random)
    delays = [backoff.next_delay() for _ in range(200)]
    assert all(0.0 <= d < 1.0 for d in delays)
    # Not bunched around the middle (±50% jitter never goes below 0.5 of the ceiling).
    assert min(delays) < 0.1 and max(delays) > 0.9


def test_reset_starts_again_from_the_first_delay() -> None:
    backoff = Backoff(first=0.05, cap=5.0, rand=lambda: 1.0)
    for _ in range(10):
        backoff.next_delay()
    assert backoff.ceiling == 5.0
    backoff.reset()
    assert backoff.next_delay() == 0.05


def test_a_first_delay_of_zero_never_waits() -> None:
    backoff = Backoff(first=0.0, cap=5.0, rand=lambda: 1.0)
    assert [backoff.next_delay() for _ in range(5)] == [0.0] * 5


@pytest.mark.parametrize(("first", "cap"), [(-1.0, 1.0), (2.0, 1.0)])
def test_a_negative_first_delay_or_one_above_the_cap_is_refused(first: float, cap: float) -> None:
    with pytest.raises(ValueError, match="first"):
        Backoff(first=first, cap=cap)


def test_the_worker_paces_its_retries_from_its_own_bounds() -> None:
    backoff = outage.retry_pacing()
    assert backoff.ceiling == outage.FIRST_DELAY
    for _ in range(20):
        assert 0.0 <= backoff.next_delay() <= outage.MAX_DELAY
    assert backoff.ceiling == outage.MAX_DELAY
