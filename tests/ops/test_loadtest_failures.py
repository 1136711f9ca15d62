"""`fanout loadtest` tells the truth when it cannot connect (SPEC §8): failed connections are
errors with their cause, nothing is published to nobody, the exit status is non-zero,
and the progress line never shows a negative rate."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import subprocess
import sys
from typing import Any

import orjson
import pytest

from common.loadtest.fleet import Tally, progress
from tests.support.harness import ROOT, Cluster, free_port


async def _loadtest(env: dict[str, str], *args: str) -> tuple[int, dict[str, Any], str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "common.cli",
        "loadtest",
        "--json",
        "--connections",
        "20",
        "--duration",
        "1",
        "--settle",
        "0.5",
        "--connect-timeout",
        "3",
        *args,
        env={**os.environ, **env},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, orjson.loads(out), err.decode()


@pytest.mark.parametrize("failure", ["closed port", "bad secret"])
async def test_every_connection_failed_is_an_error_with_its_cause(
    failure: str, cluster: Cluster, env: dict[str, str]
) -> None:
    if failure == "closed port":
        url, cause = f"ws://127.0.0.1:{free_port()}/ws", "ConnectionRefusedError"
    else:
        node = await cluster.node()
        url, cause = node.ws_url, "refused 401"
    args = ["--url", url]
    if failure == "bad secret":  # tokens the node does not accept
        args += ["--secret", "another-secret-of-at-least-32-bytes!!"]
    code, report, err = await _loadtest(env, *args)

    assert code == 1, err
    assert report["connections"]["made"] == 0
    assert report["connections"]["failed"] == 20
    assert report["published"] == 0, "published to nobody"
    causes = {k: v for k, v in report["errors"].items() if k.startswith("connect failed")}
    assert sum(causes.values()) == 20, report["errors"]
    assert all(cause in k for k in causes), causes
    assert report["errors"]["total"] >= 20
    assert err.count("\n") < 20, f"one line per refused client:\n{err}"


async def test_progress_rate_is_never_negative() -> None:
    class Fleet:
        connected: list[object] = []
        users = ["u"]
        failed = 0

        class config:  # stands in for LoadConfig
            devices = 1

    tally = Tally(delivered=5000)
    out = io.StringIO()
    with contextlib.redirect_stderr(out):
        ticker = asyncio.create_task(progress(Fleet(), tally))  # type: ignore[arg-type]
        await asyncio.sleep(0.3)
        tally.delivered = 40  # the chat driver restarts the count after its warm-up
        await asyncio.sleep(1.0)
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
    line = out.getvalue()
    assert "rate 40/s" in line, line
    assert "rate -" not in line
