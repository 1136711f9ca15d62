"""The command line's help states the defaults the processes really use (one source)."""

from __future__ import annotations

import contextlib
import io
import re

import pytest

from common.cli import main
from common.config import Settings


def _help(*argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main([*argv, "--help"])
    return " ".join(out.getvalue().split())


def test_worker_help_names_the_real_concurrency_default() -> None:
    text = _help("worker")
    found = re.search(r"FANOUT_WORKER_CONCURRENCY, default (\d+)", text)
    assert found, text
    assert int(found[1]) == Settings.from_env({}).worker_concurrency
