"""Under root, the embedded Postgres runs as another account: binaries inside a folder that
account cannot enter (a checkout under /root, a 0700 temp folder) are run from a copy."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from common.localcluster.embedded_postgres import _can_traverse, _reachable, _server_account


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands Postgres to another account")
def test_binaries_out_of_the_accounts_reach_are_run_from_a_copy(tmp_path: Path) -> None:
    closed = tmp_path / "closed"
    binaries = closed / "pginstall" / "bin"
    binaries.mkdir(parents=True)
    closed.chmod(0o700)
    fake = binaries / "postgres"
    fake.write_text("#!/bin/sh\necho 'postgres (PostgreSQL) 99'\n")
    fake.chmod(0o755)
    account = _server_account(tmp_path / "pgdata")
    assert account is not None
    assert not _can_traverse(fake, account)

    reached = _reachable(binaries, account)
    try:
        assert reached != binaries
        assert _can_traverse(reached / "postgres", account)
        out = subprocess.run(
            [str(reached / "postgres")],
            user=account.uid,
            group=account.gid,
            extra_groups=[],
            cwd="/",
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
        assert "PostgreSQL" in out
        assert _reachable(binaries, account) == reached  # made once
    finally:
        shutil.rmtree(reached.parent, ignore_errors=True)
