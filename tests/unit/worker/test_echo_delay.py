"""FANOUT_ECHO_DELAY reaches the echo assistant a worker runs (the demo's visible stream)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from common.config import Settings
from common.store.postgres import MessageRecord
from worker.assistant import echo
from worker.assistant.loader import open_generator


@pytest.mark.parametrize(("configured", "expected"), [("0.3", [0.3, 0.3, 0.3]), (None, [])])
async def test_the_configured_delay_spaces_the_chunks(
    configured: str | None, expected: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(echo.asyncio, "sleep", sleep)
    env = {"FANOUT_ECHO_DELAY": configured} if configured else {}
    settings = Settings.from_env(env)
    message = MessageRecord(
        1, "s", "c", "user", "u", "d", "one two three four five six", None, datetime.now(UTC)
    )
    store: Any = None  # the echo assistant reads nothing from it
    async with open_generator(settings, store) as (generator, _):
        chunks = [chunk async for chunk in generator.reply(None, message)]  # type: ignore[arg-type]
    assert "".join(chunks) == "You said: one two three four five six"
    assert waits == expected
