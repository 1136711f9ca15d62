"""docs/screenshots/dashboard.png: the dashboard of a local cluster while `fanout loadtest` runs.

    .venv/bin/python scripts/dashboard_screenshot.py [--out PATH]

Starts `fanout up` (2 nodes, 2 workers) on free ports with a Redis of its own (embedded)
and a throw-away database on the local Postgres (or an embedded one), runs a bounded
loadtest against both nodes (200 users x 2 devices, 2,000 deliveries/s, 25 s), opens
`/dashboard#token=...` in headless Chromium (FANOUT_CHROMIUM or `chromium` on PATH)
mid-run and saves a full-page screenshot. Everything it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from playwright.async_api import async_playwright

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 90.0


def _free_port() -> int:
    import socket

    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port + 101 > 65535:
            continue
        # The second node takes port + 1, the two workers port + 100 and + 101.
        with socket.socket() as a, socket.socket() as b, socket.socket() as c:
            try:
                a.bind(("127.0.0.1", port + 1))
                b.bind(("127.0.0.1", port + 100))
                c.bind(("127.0.0.1", port + 101))
            except OSError:
                continue
        return port
    raise RuntimeError("no free ports")


def _wait_banner(out: Path, up: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        text = out.read_text(errors="replace")
        if "fanout up: ready" in text and "logs:" in text:
            return text
        if up.poll() is not None:
            raise RuntimeError(f"fanout up exited:\n{text}")
        time.sleep(0.2)
    raise RuntimeError(f"fanout up not ready:\n{out.read_text(errors='replace')}")


async def _shoot(url: str, path: Path, chromium: str) -> None:
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            page = await browser.new_page(viewport={"width": 1440, "height": 1000})
            await page.goto(url)
            await page.wait_for_selector("#total-users .value")
            # Let the charts gather a few points of the run.
            await page.wait_for_timeout(8000)
            path.parent.mkdir(parents=True, exist_ok=True)
            await page.screenshot(path=str(path), full_page=True)
            users = await page.inner_text("#total-users .value")
            drops = await page.inner_text("#total-drops-total .value")
            p99 = await page.inner_text("#total-latency-p99-ms .value")
            print(f"dashboard: users {users}, drops {drops}, delivery p99 {p99} ms")
        finally:
            await browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "screenshots" / "dashboard.png"))
    args = parser.parse_args()
    chromium = os.environ.get("FANOUT_CHROMIUM") or shutil.which("chromium")
    if not chromium:
        sys.exit("no chromium: apt-get install chromium, or set FANOUT_CHROMIUM")
    port = _free_port()
    data = Path(tempfile.mkdtemp(prefix="fanout-shot-"))
    data.chmod(0o755)  # an embedded Postgres runs as another user under root
    env = {k: v for k, v in os.environ.items() if not k.startswith("FANOUT_")}
    env.update(
        FANOUT_REDIS_URL=f"redis://127.0.0.1:{_free_port()}/0",
        FANOUT_DATABASE_URL=f"postgresql://127.0.0.1:5432/fanout_shot_{os.getpid()}",
    )
    out = data / "up.out"
    with out.open("wb") as sink:
        up = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "common.cli",
                "up",
                "--port",
                str(port),
                "--data-dir",
                str(data),
            ],
            cwd=ROOT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    load: subprocess.Popen[bytes] | None = None
    try:
        banner = _wait_banner(out, up)
        link = re.search(r"(http://\S+/dashboard#token=\S+)", banner)
        assert link, banner
        load = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "common.cli",
                "loadtest",
                "--data-dir",
                str(data),
                "--users",
                "200",
                "--devices",
                "2",
                "--rate",
                "2000",
                "--duration",
                "25",
                "--quiet",
            ],
            cwd=ROOT,
            env=env,
        )
        time.sleep(6)  # connected and publishing
        asyncio.run(_shoot(link[1], Path(args.out), chromium))
        print(f"saved {args.out}")
        load.wait(120)
    finally:
        if load is not None and load.poll() is None:
            load.kill()
        up.send_signal(signal.SIGINT)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
        shutil.rmtree(data, ignore_errors=True)
        asyncio.run(_drop_database(env["FANOUT_DATABASE_URL"]))


async def _drop_database(url: str) -> None:
    import asyncpg

    base, name = url.rsplit("/", 1)
    try:
        conn = await asyncpg.connect(f"{base}/postgres")
    except OSError:
        return  # it was an embedded Postgres, gone with its folder
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


if __name__ == "__main__":
    main()
