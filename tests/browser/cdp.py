"""A headless Chromium driven over the DevTools protocol: just what the dashboard test needs."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--remote-debugging-address=127.0.0.1",
    "--remote-debugging-port=0",
)


class Page:
    """One tab: commands by id, and the page's console errors and exceptions."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self.errors: list[str] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self._ws:
            data = orjson.loads(msg.data)
            if "id" in data:
                future = self._waiting.pop(data["id"], None)
                if future is not None and not future.done():
                    if "error" in data:
                        future.set_exception(RuntimeError(str(data["error"])))
                    else:
                        future.set_result(data.get("result", {}))
            elif data.get("method") == "Runtime.exceptionThrown":
                self.errors.append(str(data["params"]["exceptionDetails"]))
            elif (
                data.get("method") == "Runtime.consoleAPICalled"
                and data["params"]["type"] == "error"
            ):
                self.errors.append(str(data["params"]["args"]))

    async def send(self, method: str, **params: Any) -> Any:
        call_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[call_id] = future
        await self._ws.send_str(
            orjson.dumps({"id": call_id, "method": method, "params": params}).decode()
        )
        return await asyncio.wait_for(future, 30)

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 10, what: str = "") -> Any:
        """Poll a JavaScript expression until it is truthy; its value."""
        deadline = time.monotonic() + timeout
        value: Any = None
        while time.monotonic() < deadline:
            try:
                value = await self.evaluate(expression)
            except RuntimeError as exc:  # e.g. the page is still loading
                value = exc
            if value and not isinstance(value, RuntimeError):
                return value
            await asyncio.sleep(0.1)
        raise AssertionError(f"{what or expression} not true after {timeout}s (last: {value!r})")

    async def click(self, selector: str) -> None:
        """A real mouse click in the middle of an element."""
        box = await self.evaluate(
            f"(() => {{ const r = document.querySelector({orjson.dumps(selector).decode()})"
            ".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            await self.send(
                "Input.dispatchMouseEvent",
                type=kind,
                x=box[0],
                y=box[1],
                button="left",
                clickCount=1,
            )

    async def type_into(self, selector: str, text: str) -> None:
        """Focus an input and type text into it, as a keyboard would."""
        await self.click(selector)
        await self.send("Input.insertText", text=text)

    async def screenshot(self, path: Path) -> Path:
        shot = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self._ws.close()


@contextlib.asynccontextmanager
async def browser_page(
    binary: str, profile: Path, width: int = 1440, height: int = 1600
) -> AsyncIterator[Page]:
    """A Chromium process with one blank page; killed on exit."""
    proc = subprocess.Popen(
        [binary, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port = await _devtools_port(profile, proc)
        async with aiohttp.ClientSession() as http:
            async with http.put(f"http://127.0.0.1:{port}/json/new?about:blank") as resp:
                target = await resp.json(content_type=None)
            ws = await http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=64 << 20)
            page = Page(ws)
            try:
                for domain in ("Page", "Runtime"):
                    await page.send(f"{domain}.enable")
                await page.send(
                    "Emulation.setDeviceMetricsOverride",
                    width=width,
                    height=height,
                    deviceScaleFactor=1,
                    mobile=False,
                )
                yield page
            finally:
                await page.close()
    finally:
        proc.kill()
        proc.wait(10)


async def _devtools_port(profile: Path, proc: subprocess.Popen[bytes]) -> int:
    """Chromium writes its DevTools port to the profile once it listens."""
    marker = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with {proc.returncode}")
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int(marker.read_text().split()[0])
        await asyncio.sleep(0.05)
    raise RuntimeError("chromium did not open its DevTools port in 30s")
