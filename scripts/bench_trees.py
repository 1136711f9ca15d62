"""Source trees side by side (bench_ab, bench_handover, bench_ping_flood): the trees named on
the command line, a run's environment with a namespace and database of its own, and the
runs alternating tree by tree, with that namespace cleared after each and the whole
removed at the end."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from bench_cluster import ROOT, clear_namespace, drop_database

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
DEFAULT_POSTGRES = "postgresql://127.0.0.1:5432"  # the server; the database is the run's


def parse_trees(specs: list[str]) -> list[tuple[str, str]]:
    """NAME=PATH arguments as (name, path) pairs."""
    return [(name, path) for name, path in (spec.split("=", 1) for spec in specs)]


def scratch_env(
    tag: str,
    run_id: str,
    *,
    drain_timeout: int,
    redis_url: str = DEFAULT_REDIS,
    postgres: str = DEFAULT_POSTGRES,
    unbuffered: bool = True,
) -> dict[str, str]:
    """The trees' FANOUT_* settings for one invocation: namespace `{tag}{run_id}:` and
    database `fanout_{tag}_{run_id}` on the `postgres` server."""
    env = {
        "FANOUT_REDIS_URL": redis_url,
        "FANOUT_DATABASE_URL": f"{postgres}/fanout_{tag}_{run_id}",
        "FANOUT_NAMESPACE": f"{tag}{run_id}:",
        "FANOUT_JWT_SECRET": secrets.token_urlsafe(32),
        "FANOUT_DRAIN_TIMEOUT": str(drain_timeout),
    }
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    return env


@contextmanager
def scratch_database(env: dict[str, str]) -> Iterator[None]:
    """Migrate env's database (this tree's `fanout migrate`); on exit clear env's namespace
    and drop that database."""
    subprocess.run(
        [sys.executable, "-m", "common.cli", "migrate"],
        env={**os.environ, **env},
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    try:
        yield
    finally:
        clear_namespace(env["FANOUT_REDIS_URL"], env["FANOUT_NAMESPACE"])
        server, database = env["FANOUT_DATABASE_URL"].rsplit("/", 1)
        asyncio.run(drop_database(f"{server}/postgres", database))


def alternate(
    trees: list[tuple[str, str]], runs: int, env: dict[str, str]
) -> Iterator[tuple[int, str, str]]:
    """(run, name, path) for each run and tree in turn, so a noisy neighbour hits every tree;
    env's namespace is cleared after each."""
    for run in range(runs):
        for name, tree in trees:
            yield run, name, tree
            clear_namespace(env["FANOUT_REDIS_URL"], env["FANOUT_NAMESPACE"])
