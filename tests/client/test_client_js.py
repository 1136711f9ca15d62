"""The browser client's JavaScript checks: `node --test` of its pure parts and `tsc --noEmit`
of an example against fanout.d.ts (tests/js/; TypeScript pinned in its package-lock.json)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.support.harness import ROOT

JS = ROOT / "tests" / "js"
NODE = shutil.which("node")
NPM = shutil.which("npm")

pytestmark = pytest.mark.skipif(
    NODE is None or NPM is None, reason="no node/npm (apt-get install nodejs npm)"
)


def run(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=JS, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_client_unit_tests_pass_in_node() -> None:
    assert NODE is not None
    done = run(NODE, "--test", timeout=60)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "# fail 0" in done.stdout and "# pass 0" not in done.stdout


def test_declarations_type_check_an_example() -> None:
    assert NPM is not None
    tsc = JS / "node_modules" / ".bin" / "tsc"
    if not tsc.exists():
        # .ci/run installs it; a fresh checkout gets the pinned version here.
        # No retries and a bounded fetch: offline (a fresh machine without a package
        # index) fails in seconds, not after npm's minutes of back-off.
        installed = run(
            NPM,
            "ci",
            "--no-audit",
            "--no-fund",
            "--fetch-retries=0",
            "--fetch-timeout=20000",
            timeout=100,
        )
        if installed.returncode != 0 and any(
            code in installed.stderr
            for code in ("ENOTFOUND", "EAI_AGAIN", "ENETUNREACH", "ECONNREFUSED")
        ):
            pytest.skip(
                "npm cannot reach its registry to install TypeScript: run `npm ci` in tests/js"
            )
        assert installed.returncode == 0, installed.stderr[-2000:]
    done = run(str(tsc), "--noEmit", "-p", "tsconfig.json", timeout=120)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
