"""`fanout up` where nothing answers on the Redis/Postgres ports: it starts embedded ones,
serves a chat end to end, and leaves nothing running after Ctrl-C (SPEC §3)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs

import aiohttp
import pytest

from common.auth import mint_token
from tests.support.harness import ROOT, Client, free_port, is_type

READY_TIMEOUT = 60.0  # a first start runs initdb
STOP_TIMEOUT = 40.0


def _free_node_port() -> int:
    """A port P free for the first node with P + 1 (second node) and P + 100 (worker) free."""
    for _ in range(50):
        port = free_port()
        if port + 100 <= 65535 and _is_free(port + 1) and _is_free(port + 100):
            return port
    raise RuntimeError("no free port pair")


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _accepts(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time) of a live process, None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw.rpartition(")")[2].split()
    return int(fields[1]), fields[19]


def _descendants(root: int) -> dict[int, str]:
    """Every process below root, as pid -> start time (to tell a reused pid apart)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (info := _stat(int(entry.name))):
            table[int(entry.name)] = info
    found: dict[int, str] = {}
    frontier = {root}
    while frontier:
        children = {pid for pid, (ppid, _) in table.items() if ppid in frontier}
        found.update({pid: table[pid][1] for pid in children})
        frontier = children - frontier
    return found


def _still_running(seen: dict[int, str]) -> list[str]:
    alive = []
    for pid, started in seen.items():
        info = _stat(pid)
        if info and info[1] == started:
            alive.append(_cmdline(pid))
    return alive


def _cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    return f"pid {pid}"


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Not tmp_path: under root, Postgres runs as another user, who cannot enter
    # pytest's 0700 /tmp/pytest-of-root.
    folder = Path(tempfile.mkdtemp(prefix="fanout-up-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


async def test_up_starts_embedded_services_serves_a_chat_and_stops_clean(data_dir: Path) -> None:
    redis_port, postgres_port, node_port = free_port(), free_port(), _free_node_port()
    ports = (redis_port, postgres_port, node_port, node_port + 1, node_port + 100)
    assert not any(_accepts(p) for p in ports)
    # As a newcomer runs it: scripts/dev, no FANOUT_JWT_SECRET (up makes a dev secret).
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FANOUT_")}
    env = {
        **clean,
        "FANOUT_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        "FANOUT_DATABASE_URL": f"postgresql://127.0.0.1:{postgres_port}/fanout",
        "FANOUT_PARTITIONS": "4",
        "FANOUT_DRAIN_TIMEOUT": "5",
    }
    output = data_dir / "up.out"
    with output.open("wb") as out:
        up = subprocess.Popen(
            [
                "scripts/dev",
                "up",
                "--nodes",
                "2",
                "--workers",
                "1",
                "--port",
                str(node_port),
                "--data-dir",
                str(data_dir),
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )
    seen: dict[int, str] = {}
    try:
        await _wait_ready(up, node_port, output)
        seen = _descendants(up.pid)
        commands = " ".join(_cmdline(pid) for pid in seen)
        assert "redis-server" in commands or "valkey-server" in commands, commands
        assert "postgres" in commands, commands
        banner = output.read_text()
        assert "Redis embedded" in banner, banner
        assert (data_dir / "cluster.json").exists()

        secret = (data_dir / "jwt-secret").read_text().strip()
        await _printed_commands_work(banner, node_port, clean)
        try:
            await _chat_end_to_end(node_port, secret)
        except (AssertionError, TimeoutError, ConnectionError) as exc:
            raise AssertionError(f"chat failed: {exc!r}\n{_logs(data_dir)}") from exc
        seen.update(_descendants(up.pid))

        started = time.monotonic()
        up.send_signal(signal.SIGINT)
        code = await _wait_exit(up, STOP_TIMEOUT)
        assert code == 0, f"exit {code} after SIGINT:\n{output.read_text()}"
        print(f"stopped in {time.monotonic() - started:.1f} s")
        assert not _still_running(seen), _still_running(seen)
        assert not [p for p in ports if _accepts(p)], output.read_text()
        assert not (data_dir / "cluster.json").exists()
    finally:
        _kill_leftovers(up, seen)


def _printed(banner: str, marker: str) -> str:
    """The one banner line holding marker, without its indentation."""
    found = [line.strip() for line in banner.splitlines() if marker in line]
    assert len(found) == 1, (marker, banner)
    return found[0]


def _shell(command: str, env: dict[str, str], timeout: float = 60) -> str:
    """Run a printed command in bash from the repository root, as a user would; its stdout."""
    result = subprocess.run(
        ["bash", "-c", command],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, f"{command!r} exited {result.returncode}:\n{result}"
    return result.stdout


async def _printed_commands_work(banner: str, port: int, env: dict[str, str]) -> None:
    """Every command the banner prints, run as printed (no FANOUT_* in the environment)."""
    base = f"http://127.0.0.1:{port}"
    export = _printed(banner, "export TOKEN=")
    curl = _printed(banner, "curl ")
    if shutil.which("curl"):
        made = _shell(f"{export}\n{curl}", env)
        assert '"status":"pending"' in made.replace(" ", ""), made
    bob = _shell(_printed(banner, " token bob"), env).strip()
    admin = _printed(banner, "/dashboard#token=").split("#token=", 1)[1]
    demo_page, demo_fragment = _printed(banner, "/demo#token=").split(" ")[-1].split("#", 1)
    demo = parse_qs(demo_fragment)
    assert len(demo["nodes"][0].split(",")) == 2, demo  # the page may move between them
    async with aiohttp.ClientSession() as http:
        for token, path in (
            (bob, "/api/v1/sessions"),
            (admin, "/admin/stats"),
            (demo["token"][0], "/api/v1/sessions"),
        ):
            headers = {"Authorization": f"Bearer {token}"}
            async with http.get(f"{base}{path}", headers=headers) as resp:
                assert resp.status == 200, (path, await resp.text())
        async with http.get(demo_page) as resp:
            assert resp.status == 200 and resp.content_type == "text/html"
    report = _shell(_printed(banner, " loadtest "), env, timeout=90)
    assert "2 node URL(s)" in report, report


def _logs(data_dir: Path) -> str:
    """The end of every log of the cluster, for a failure message."""
    parts = []
    for path in sorted((data_dir / "logs").glob("*.log")):
        tail = path.read_text(errors="replace").splitlines()[-25:]
        parts.append(f"--- {path.name}\n" + "\n".join(tail))
    return "\n".join(parts)


async def _wait_ready(up: subprocess.Popen[bytes], port: int, output: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            assert up.poll() is None, f"`fanout up` exited {up.returncode}:\n{output.read_text()}"
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                    if resp.status == 200 and "ready -" in output.read_text():
                        return
            await asyncio.sleep(0.1)
    raise AssertionError(f"not ready after {READY_TIMEOUT} s:\n{output.read_text()}")


async def _chat_end_to_end(port: int, secret: str) -> None:
    auth = {"Authorization": f"Bearer {mint_token(secret, 'alice')}"}
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession(headers=auth) as http:
        async with http.post(f"{base}/api/v1/sessions", json={"participants": []}) as resp:
            assert resp.status == 201, await resp.text()
            session_id = (await resp.json())["id"]
        ws = await http.ws_connect(f"{base}/ws", params={"device_id": "laptop"})
        client = Client(ws, http)
        try:
            assert (await client.recv())["type"] == "welcome"
            msg_id = uuid.uuid4().hex
            await client.send(
                {"type": "chat", "id": msg_id, "session_id": session_id, "content": "hi"}
            )
            await client.until(is_type("ack", id=msg_id), timeout=20)
            mine = await client.until(is_type("message", message__client_msg_id=msg_id), 20)
            assert isinstance(mine["seq"], int)
            reply = await client.until(is_type("message", message__role="assistant"), 30)
            assert reply["seq"] > mine["seq"]
        finally:
            await ws.close()


async def _wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    return proc.poll()


def _kill_leftovers(up: subprocess.Popen[bytes], seen: dict[int, str]) -> None:
    # Only after a failure: the test itself must not leave processes behind.
    if up.poll() is None:
        up.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            up.wait(STOP_TIMEOUT)
    seen.update(_descendants(up.pid) if up.poll() is None else {})
    if up.poll() is None:
        up.kill()
        up.wait()
    for pid, started in seen.items():
        info = _stat(pid)
        if info and info[1] == started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
