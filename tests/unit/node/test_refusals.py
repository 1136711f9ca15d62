"""The node's UNAVAILABLE log: one line a second during an outage, with a count."""

from __future__ import annotations

import logging

import pytest

from node.ws.socket import _Refusals


def test_an_outage_logs_one_line_a_second(caplog: pytest.LogCaptureFixture) -> None:
    refusals = _Refusals()
    with caplog.at_level(logging.WARNING, logger="fanout.node"):
        for _ in range(500):
            refusals.note("chat", ConnectionError("redis down"))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "1 frame(s)" in lines[0] and "redis down" in lines[0]
    refusals._logged_at -= 1.0  # a second later
    with caplog.at_level(logging.WARNING, logger="fanout.node"):
        refusals.note("typing", ConnectionError("still down"))
    assert "500 frame(s)" in caplog.records[-1].getMessage(), "the count since the last line"
