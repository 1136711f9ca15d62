"""A fanout WebSocket client: reconnects to any node, resumes from its last seq, de-duplicates.

Used by the tests and the load generator, and small enough to serve as the
reference for client authors. It keeps the newest seq it has handed over; every
(re)connect asks for `last_seq`, so the node replays what was missed. A frame whose
seq is not new is a duplicate and dropped; a seq past the next one is a gap, which
a correct cluster never produces (it is counted, so checkers can assert on it).

A receiver of many frames (the load generator) can take logged frames raw with
`on_logged(seq, text)`: the seq is read from the fixed ``{"seq":N,`` prefix the
delivery script writes, and the frame is not JSON-parsed at all (see common/transport/bus.py).
Frames are handled as common/client/websocket.py parses them, without a task wake-up each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from common.backoff import Backoff
from common.client import websocket as wsclient

log = logging.getLogger("fanout.client")

FrameHandler = Callable[[dict[str, Any]], None]
# A logged frame handed over raw: (seq, the frame's text). Called only for new seqs.
LoggedHandler = Callable[[int, str], None]
# A logged frame dropped as not new: its seq (a duplicate, or one that came late).
StaleHandler = Callable[[int], None]

SEQ_PREFIX = '{"seq":'
_SEQ_AT = len(SEQ_PREFIX)


@dataclass
class ClientStats:
    connects: int = 0
    failed_attempts: int = 0
    delivered: int = 0
    duplicates: int = 0
    gaps: int = 0
    missed: int = 0
    incomplete_resumes: int = 0
    closes: list[int] = field(default_factory=list)
    # Why the last connection attempt failed ("" if none has): for reports.
    last_failure: str = ""


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
        on_logged: LoggedHandler | None = None,
        on_stale: StaleHandler | None = None,
        first_url: int | None = None,
    ) -> None:
        """`on_logged` takes logged frames raw instead of `on_frame` (see the module doc);
        `first_url` is the index in `urls` to try first (default: a random one)."""
        self._urls = urls
        self._token = token if callable(token) else (lambda: token)
        self.device_id = device_id
        self._on_frame = on_frame or (lambda frame: None)
        self._on_logged = on_logged
        self._on_stale = on_stale
        self.last_seq = last_seq
        self._session_id = session_id
        self._backoff = backoff
        self._next_url = random.randrange(len(urls)) if first_url is None else first_url
        self.stats = ClientStats()
        self.node_id: str | None = None
        self._ws: wsclient.WebSocket | None = None
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.fatal: str | None = None

    async def __aenter__(self) -> FanoutClient:
        self._task = asyncio.create_task(self._run(), name=f"client-{self.device_id}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        # Cancelling the task closes its connection with a close handshake (`_session`).
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def wait_connected(self, within: float = 10) -> None:
        """Wait for a live connection: TimeoutError after `within` s, ConnectionError if refused."""
        if self._connected.is_set():
            return
        waiter = asyncio.ensure_future(self._connected.wait())
        watched: list[asyncio.Future[Any]] = [waiter]
        if self._task is not None:
            watched.append(self._task)
        try:
            await asyncio.wait(watched, timeout=within, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if self._connected.is_set():
            return
        if self._task is not None and self._task.done():
            raise ConnectionError(self.fatal or "the client stopped")
        raise TimeoutError(f"{self.device_id}: not connected after {within} s")

    async def send(self, frame: dict[str, Any]) -> None:
        """Send on the current connection (waits for one)."""
        await self.wait_connected(30)
        if self._ws is None:
            raise ConnectionError(f"{self.device_id}: the connection just dropped")
        self._ws.send_text(orjson.dumps(frame))

    def drop(self) -> None:
        """Cut the connection abruptly (tests: a network failure)."""
        if self._ws is not None:
            self._ws.abort()

    async def _run(self) -> None:
        first, cap = self._backoff
        backoff = Backoff(first=first, cap=cap)
        while True:
            url = self._urls[self._next_url % len(self._urls)]
            self._next_url += 1
            try:
                await self._session(url)
                backoff.reset()
            except asyncio.CancelledError:
                raise
            except wsclient.HandshakeError as exc:
                self.stats.last_failure = f"refused {exc.status}"
                if exc.status in (400, 401, 403):
                    self.fatal = f"refused {exc.status}"
                    log.error(
                        "%s: connection refused with %d; giving up", self.device_id, exc.status
                    )
                    return
                self.stats.failed_attempts += 1  # 429 (device limit) or 503: try again
            except (OSError, TimeoutError) as exc:
                self.stats.failed_attempts += 1
                self.stats.last_failure = f"{type(exc).__name__}: {exc}".rstrip(": ")
                log.debug("%s: %s: %r", self.device_id, url, exc)
            self._connected.clear()
            # Capped exponential back-off with jitter: a node dying must not make all
            # its clients reconnect to the next one in the same millisecond.
            await asyncio.sleep(backoff.next_delay())

    async def _session(self, url: str) -> None:
        params = {"device_id": self.device_id}
        if self.last_seq is not None:
            params["last_seq"] = str(self.last_seq)
        if self._session_id is not None:
            params["session_id"] = self._session_id
        ws = await wsclient.connect(
            url,
            self._on_text,
            params=params,
            headers={"Authorization": f"Bearer {self._token()}"},
        )
        self._ws = ws
        self.stats.connects += 1
        try:
            await ws.wait_closed()
        finally:
            # Cancelled (the client is leaving): close with a handshake, bounded in time.
            code = await ws.close()
            self.stats.closes.append(code)
            self._connected.clear()
            self._ws = None

    def _on_text(self, data: str) -> None:
        lean = self._on_logged
        if lean is not None and data.startswith(SEQ_PREFIX):
            seq = int(data[_SEQ_AT : data.index(",", _SEQ_AT)])
            if self._accept(seq):
                lean(seq, data)
            return
        self._receive(orjson.loads(data))

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
        if seq is not None and not self._accept(seq):
            return
        self._on_frame(frame)

    def _accept(self, seq: int) -> bool:
        """Whether a logged frame is new (handed over) or not (dropped as a duplicate)."""
        last = self.last_seq or 0
        if seq <= last:
            self.stats.duplicates += 1
            if self._on_stale is not None:
                self._on_stale(seq)
            return False
        if seq > last + 1:
            self.stats.gaps += 1
            self.stats.missed += seq - last - 1
        self.last_seq = seq
        self.stats.delivered += 1
        return True
