"""A real 3-primary Redis Cluster of this test's own, on free loopback ports: redis-server
processes, slots assigned and nodes introduced with CLUSTER commands (fixtures).
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import redis.exceptions

from common.localcluster.embedded import EmbeddedError, redis_server_binary, stop_process
from tests.support.harness import free_port

SLOTS = 16384


def _redis_server() -> str:
    """A redis-server with sharded pub/sub (7+); without one, skip with what to install."""
    try:
        return redis_server_binary()
    except EmbeddedError as exc:
        pytest.skip(str(exc))


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free and valid too."""
    for _ in range(1000):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no port pair for a cluster node")


@pytest.fixture
def cluster_ports(tmp_path: Path) -> Iterator[list[int]]:
    ports = [_cluster_port() for _ in range(3)]
    procs = []
    for port in ports:
        folder = tmp_path / f"redis-{port}"
        folder.mkdir()
        procs.append(
            subprocess.Popen(
                [
                    _redis_server(),
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(folder / "nodes.conf"),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(folder),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    try:
        yield ports
    finally:
        import signal

        for proc in procs:
            stop_process(proc, [(signal.SIGTERM, 10.0)])


async def _form_cluster(ports: list[int]) -> None:
    clients = [aioredis.Redis(port=p) for p in ports]
    try:
        for client in clients:
            for _ in range(100):
                try:
                    await client.ping()
                    break
                except (OSError, redis.exceptions.ConnectionError):
                    await asyncio.sleep(0.05)
        share = SLOTS // len(ports)
        for i, client in enumerate(clients):
            # Distinct epochs, as `redis-cli --cluster create` sets: no epoch collisions
            # to resolve before the cluster agrees on who owns what.
            await client.execute_command("CLUSTER SET-CONFIG-EPOCH", i + 1)
            end = SLOTS if i == len(ports) - 1 else (i + 1) * share
            await client.execute_command("CLUSTER ADDSLOTS", *range(i * share, end))
        for port in ports[1:]:
            await clients[0].execute_command("CLUSTER MEET", "127.0.0.1", port)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            infos = [await c.execute_command("CLUSTER INFO") for c in clients]
            # redis-py parses the reply into a dict (bytes in older versions).
            if all(
                "cluster_state:ok" in str(info)
                or (isinstance(info, dict) and info.get("cluster_state") == "ok")
                for info in infos
            ):
                return
            await asyncio.sleep(0.1)
        raise TimeoutError("cluster did not become ok")
    finally:
        for client in clients:
            await client.aclose()


@pytest.fixture
async def redis_cluster(cluster_ports: list[int]) -> str:
    await _form_cluster(cluster_ports)
    return f"redis://127.0.0.1:{cluster_ports[0]}/0"
