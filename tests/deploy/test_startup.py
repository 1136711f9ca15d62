"""A node's start (SPEC §3): it listens with Redis or Postgres down and recovers when they
answer; a port in use is a start error unless FANOUT_REUSE_PORT=1."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import pytest

from common.localcluster.embedded import Services
from tests.support.harness import Cluster, Proc, connect, free_port, wait_ready
from tests.support.proxy import CuttableProxy


def _through(url: str, port: int) -> str:
    """url with its host:port replaced by the proxy's loopback port."""
    parts = urlsplit(url)
    auth = parts.netloc.rsplit("@", 1)[0] + "@" if "@" in parts.netloc else ""
    return urlunsplit(parts._replace(netloc=f"{auth}127.0.0.1:{port}"))


async def _get(proc: Proc, path: str, timeout: float = 10) -> tuple[int, Any]:
    """The first answer of the node at path (retried while it is not listening yet)."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while True:
            assert proc.alive(), proc.log()
            try:
                async with http.get(f"{proc.url}{path}") as resp:
                    return resp.status, await resp.json()
            except aiohttp.ClientConnectionError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)


@pytest.mark.parametrize("service", ["redis", "postgres"])
async def test_a_node_listens_while_a_service_is_down_and_recovers(
    service: str, services: Services, env: dict[str, str], cluster: Cluster
) -> None:
    url = env["FANOUT_REDIS_URL"] if service == "redis" else env["FANOUT_DATABASE_URL"]
    parts = urlsplit(url)
    async with CuttableProxy(parts.hostname or "127.0.0.1", parts.port or 0) as proxy:
        proxy.cut()
        variable = "FANOUT_REDIS_URL" if service == "redis" else "FANOUT_DATABASE_URL"
        node = await cluster.node(ready=False, **{variable: _through(url, proxy.port)})

        assert await _get(node, "/healthz") == (200, {"status": "ok"})
        # Until its first probe returns the node knows nothing yet; then it names the
        # service that is down (and only that one).
        deadline = time.monotonic() + 10
        while True:
            status, body = await _get(node, "/readyz")
            assert status == 503, body
            if body[service] != "not tried yet" or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert body[service].startswith("down"), body
        other = "postgres" if service == "redis" else "redis"
        assert body[other] == "ok", body
        await asyncio.sleep(2.5)  # past one retry interval: a second log line

        proxy.heal()
        await wait_ready(node, timeout=15)
        async with connect(node, "ann", "d1") as client:
            assert client.welcome["user_id"] == "ann"

    log = node.log()
    assert "Traceback" not in log, log
    waits = [line for line in log.splitlines() if "waiting for" in line]
    assert 2 <= len(waits) <= 5, log
    assert all(service in line for line in waits), log


async def test_a_port_in_use_is_a_start_error(cluster: Cluster) -> None:
    first = await cluster.node()
    second = await cluster.node(ready=False, port=first.port)
    assert second.popen.wait(20) == 1
    log = second.log()
    assert f"port {first.port} on 127.0.0.1 is in use" in log, log
    assert "Traceback" not in log, log
    assert first.alive()


async def test_reuse_port_lets_two_nodes_share_a_port(cluster: Cluster) -> None:
    port = free_port()
    first = await cluster.node(port=port, FANOUT_REUSE_PORT="1")
    second = await cluster.node(port=port, FANOUT_REUSE_PORT="1")
    assert first.alive() and second.alive()


@pytest.mark.parametrize(
    ("command", "variable"),
    [
        ("worker", "FANOUT_DATABASE_URL"),
        ("worker", "FANOUT_REDIS_URL"),
        ("migrate", "FANOUT_DATABASE_URL"),
    ],
)
def test_worker_and_migrate_with_a_service_down_exit_with_one_line(
    command: str, variable: str, env: dict[str, str]
) -> None:
    closed = free_port()  # nothing listens there
    scheme = "redis" if variable == "FANOUT_REDIS_URL" else "postgresql"
    result = subprocess.run(
        [sys.executable, "-m", "common.cli", command],
        env={**os.environ, **env, variable: f"{scheme}://127.0.0.1:{closed}/x"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"127.0.0.1:{closed}" in lines[0]
    assert lines[0].startswith(f"fanout {command}: ")


async def test_a_worker_port_in_use_is_one_line(env: dict[str, str]) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "common.cli", "worker", "--port", str(port)],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr, result.stderr
    assert f"cannot serve health on port {port}" in result.stderr.strip().splitlines()[-1]
