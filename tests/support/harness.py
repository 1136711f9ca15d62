"""Test harness: real node and worker processes, WebSocket clients, Postgres helpers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson

from common.auth import mint_token

SECRET = "test-secret-not-for-production-0123456789abcdef"
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def token(user_id: str, *, roles: list[str] | None = None, ttl: float = 3600) -> str:
    return mint_token(SECRET, user_id, roles=roles, ttl=ttl)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up."""
        if self.alive():
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(10)

    def terminate(self, timeout: float = 30) -> int:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired as late:
            # Say what the process was doing: a stop that hangs is diagnosed from its log.
            tail = "\n".join(self.log().splitlines()[-30:])
            message = f"still running {timeout} s after SIGTERM; its log:\n{tail}"
            raise AssertionError(message) from late

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Cluster:
    """Starts fanout processes against one test's database and Redis namespace."""

    env: dict[str, str]
    tmp: Path
    procs: list[Proc] = field(default_factory=list)

    def _spawn(self, name: str, args: list[str], env: dict[str, str], port: int | None) -> Proc:
        log_path = self.tmp / f"{name}.log"
        with log_path.open("wb") as log_file:
            popen = subprocess.Popen(
                [sys.executable, "-m", "common.cli", *args],
                env={**os.environ, **self.env, **env, "FANOUT_NODE_ID": name},
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        proc = Proc(name, popen, log_path, port)
        self.procs.append(proc)
        return proc

    async def node(
        self, name: str | None = None, *, ready: bool = True, port: int | None = None, **env: str
    ) -> Proc:
        port = port or free_port()
        proc = self._spawn(name or unique("node"), ["node", "--port", str(port)], env, port)
        if ready:
            await wait_ready(proc)
        return proc

    async def worker(self, name: str | None = None, *, ready: bool = True, **env: str) -> Proc:
        port = free_port()
        proc = self._spawn(name or unique("worker"), ["worker", "--port", str(port)], env, port)
        if ready:
            await wait_ready(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.alive():
                proc.popen.send_signal(signal.SIGKILL)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(10)


async def wait_ready(proc: Proc, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited early:\n{proc.log()}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with http.get(f"{proc.url}/readyz") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{proc.name} not ready after {timeout}s:\n{proc.log()}")


async def create_session(
    node: Proc, owner: str, participants: list[str] | None = None, **body: Any
) -> str:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{node.url}/api/v1/sessions",
            json={"participants": participants or [], **body},
            headers={"Authorization": f"Bearer {token(owner)}"},
        ) as resp,
    ):
        assert resp.status == 201, await resp.text()
        session_id: str = (await resp.json())["id"]
        return session_id


class Client:
    """A test WebSocket client that records every frame it receives."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, http: aiohttp.ClientSession) -> None:
        self.ws = ws
        self._http = http
        self.frames: list[dict[str, Any]] = []
        self.welcome: dict[str, Any] = {}

    async def send(self, frame: dict[str, Any] | str) -> None:
        await self.ws.send_str(frame if isinstance(frame, str) else orjson.dumps(frame).decode())

    async def chat(self, session_id: str, content: str, msg_id: str | None = None) -> str:
        msg_id = msg_id or uuid.uuid4().hex
        await self.send(
            {"type": "chat", "id": msg_id, "session_id": session_id, "content": content}
        )
        return msg_id

    async def recv(self, timeout: float = 10) -> dict[str, Any]:
        msg = await self.ws.receive(timeout=timeout)
        if msg.type != aiohttp.WSMsgType.TEXT:
            raise ConnectionError(f"socket closed: {msg.type} {self.ws.close_code}")
        frame: dict[str, Any] = orjson.loads(msg.data)
        self.frames.append(frame)
        return frame

    async def until(
        self, match: Callable[[dict[str, Any]], bool], timeout: float = 10
    ) -> dict[str, Any]:
        """Receive until a frame matches (earlier frames are kept in `frames`)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no matching frame; got {self.frames[-5:]}")
            frame = await self.recv(left)
            if match(frame):
                return frame

    async def drain(self, quiet: float = 0.3) -> list[dict[str, Any]]:
        """Receive until nothing arrives for `quiet` seconds."""
        got = []
        with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
            while True:
                got.append(await self.recv(quiet))
        return got

    async def close(self) -> None:
        await self.ws.close()
        await self._http.close()


@contextlib.asynccontextmanager
async def connect(node: Proc, user_id: str, device_id: str, **query: str) -> AsyncIterator[Client]:
    client = await open_client(node, user_id, device_id, **query)
    try:
        yield client
    finally:
        await client.close()


async def open_client(node: Proc, user_id: str, device_id: str, **query: str) -> Client:
    http = aiohttp.ClientSession()
    params = {"device_id": device_id, **query}
    try:
        ws = await http.ws_connect(
            node.ws_url, params=params, headers={"Authorization": f"Bearer {token(user_id)}"}
        )
    except BaseException:
        await http.close()
        raise
    client = Client(ws, http)
    client.welcome = await client.recv()
    assert client.welcome["type"] == "welcome", client.welcome
    return client


def is_type(kind: str, **fields: Any) -> Callable[[dict[str, Any]], bool]:
    def match(frame: dict[str, Any]) -> bool:
        return frame.get("type") == kind and all(_get(frame, k) == v for k, v in fields.items())

    return match


def _get(frame: dict[str, Any], dotted: str) -> Any:
    value: Any = frame
    for part in dotted.split("__"):
        value = value.get(part) if isinstance(value, dict) else None
    return value


async def messages_in_db(database_url: str, session_id: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetch(
            "SELECT * FROM messages WHERE session_id = $1 ORDER BY id", uuid.UUID(session_id)
        )
    finally:
        await conn.close()


async def wait_for_lease_holders(
    redis: Any, keys: Any, *, partitions: int, holders: int, timeout: float = 15
) -> None:
    """Wait until the partition leases are spread over `holders` workers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        owners = await redis.mget([keys.partition_lease(p) for p in range(partitions)])
        if None not in owners and len(set(owners)) == holders:
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"partition leases not spread over {holders} workers")
