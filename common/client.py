"""A fanout WebSocket client: reconnects to any node, resumes from its last seq, de-duplicates.

Used by the tests and the load generator, and small enough to serve as the
reference for client authors. It keeps the newest seq it has handed over; every
(re)connect asks for `last_seq`, so the node replays what was missed. A frame whose
seq is not new is a duplicate and dropped; a seq past the next one is a gap, which
a correct cluster never produces (it is counted, so checkers can assert on it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

log = logging.getLogger("fanout.client")

FrameHandler = Callable[[dict[str, Any]], None]


@dataclass
class ClientStats:
    connects: int = 0
    delivered: int = 0
    duplicates: int = 0
    gaps: int = 0
    missed: int = 0
    incomplete_resumes: int = 0
    closes: list[int] = field(default_factory=list)


class FanoutClient:
    """One device: `async with FanoutClient(...)` connects and keeps reconnecting until exit."""

    def __init__(
        self,
        urls: list[str],
        token: str | Callable[[], str],
        device_id: str,
        *,
        on_frame: FrameHandler | None = None,
        last_seq: int | None = None,
        session_id: str | None = None,
        backoff: tuple[float, float] = (0.05, 2.0),
    ) -> None:
        self._urls = urls
        self._token = token if callable(token) else (lambda: token)
        self.device_id = device_id
        self._on_frame = on_frame or (lambda frame: None)
        self.last_seq = last_seq
        self._session_id = session_id
        self._backoff = backoff
        self._next_url = random.randrange(len(urls))
        self.stats = ClientStats()
        self.node_id: str | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._http: aiohttp.ClientSession | None = None
        self.fatal: str | None = None

    async def __aenter__(self) -> FanoutClient:
        self._http = aiohttp.ClientSession()
        self._task = asyncio.create_task(self._run(), name=f"client-{self.device_id}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._ws is not None:
            await self._ws.close()
        if self._http is not None:
            await self._http.close()

    async def wait_connected(self, within: float = 10) -> None:
        await asyncio.wait_for(self._connected.wait(), within)

    async def send(self, frame: dict[str, Any]) -> None:
        """Send on the current connection (waits for one)."""
        await self.wait_connected(30)
        assert self._ws is not None
        await self._ws.send_bytes(orjson.dumps(frame))

    def drop(self) -> None:
        """Cut the connection abruptly (tests: a network failure)."""
        if self._ws is not None and self._ws._conn is not None:
            transport = self._ws._conn.transport
            if transport is not None:
                transport.abort()

    async def _run(self) -> None:
        delay = self._backoff[0]
        while True:
            url = self._urls[self._next_url % len(self._urls)]
            self._next_url += 1
            try:
                await self._session(url)
                delay = self._backoff[0]
            except asyncio.CancelledError:
                raise
            except aiohttp.WSServerHandshakeError as exc:
                if exc.status in (400, 401, 403):
                    self.fatal = f"refused {exc.status}"
                    log.error(
                        "%s: connection refused with %d; giving up", self.device_id, exc.status
                    )
                    return
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                log.debug("%s: %s: %r", self.device_id, url, exc)
            self._connected.clear()
            # Capped exponential back-off with jitter: a node dying must not make all
            # its clients reconnect to the next one in the same millisecond.
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, self._backoff[1])

    async def _session(self, url: str) -> None:
        assert self._http is not None
        params = {"device_id": self.device_id}
        if self.last_seq is not None:
            params["last_seq"] = str(self.last_seq)
        if self._session_id is not None:
            params["session_id"] = self._session_id
        ws = await self._http.ws_connect(
            url,
            params=params,
            headers={"Authorization": f"Bearer {self._token()}"},
            heartbeat=None,
            timeout=aiohttp.ClientWSTimeout(ws_close=5),
        )
        self._ws = ws
        self.stats.connects += 1
        try:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                self._receive(orjson.loads(msg.data))
        finally:
            if ws.close_code is not None:
                self.stats.closes.append(ws.close_code)
            self._connected.clear()
            self._ws = None

    def _receive(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "welcome":
            self.node_id = frame["node_id"]
            if self.last_seq is None:
                self.last_seq = frame["last_seq"]
            self._connected.set()
        elif kind == "resumed" and not frame["complete"]:
            self.stats.incomplete_resumes += 1
        seq = frame.get("seq")
        if seq is not None:
            last = self.last_seq or 0
            if seq <= last:
                self.stats.duplicates += 1
                return
            if seq > last + 1:
                self.stats.gaps += 1
                self.stats.missed += seq - last - 1
            self.last_seq = seq
            self.stats.delivered += 1
        self._on_frame(frame)
