"""Outage logging of the worker's consumers (pure logic, a fake clock)."""

from __future__ import annotations

import logging

import pytest

from worker import outage
from worker.outage import OutageLog


def test_an_outage_is_one_warning_per_interval_not_one_per_retry(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = [100.0]
    monkeypatch.setattr(outage.time, "monotonic", lambda: clock[0])
    log = OutageLog(3, "stream", every=10.0)
    caplog.set_level(logging.INFO, logger="fanout.worker")
    for _ in range(50):  # 5 s of retries
        log.failed(ConnectionError("down"), 0.1)
        clock[0] += 0.1
    log.recovered()
    for _ in range(3):  # short outages right after: counted, not reported
        log.failed(ConnectionError("stale connection"), 0.1)
        log.recovered()
    clock[0] += 6.0
    log.failed(ConnectionError("down again"), 0.1)  # the interval has passed
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(warnings) == 2 and all(w.startswith("partition 3: stream:") for w in warnings)
    assert "1 failures since the last report" in warnings[0]
    assert "53 failures since the last report" in warnings[1]
    assert len(infos) == 1 and "answer again after 5.0s" in infos[0]
    assert log.ongoing
