"""One client WebSocket: a bounded outbound queue, written by a task only while it is not empty."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import WSMsgType

from common.protocol import CloseCode
from common.wsframe import text_frame
from node.ws.wire import Wire

log = logging.getLogger("fanout.node")

_PING = int(WSMsgType.PING)

# A peer that does not read our close frame within this time is cut (SPEC §4).
CLOSE_TIMEOUT = 10.0


class RateLimiter:
    """Token bucket of client frames, plus flood detection (over 5× the rate for 10 s)."""

    __slots__ = (
        "_burst",
        "_last_error",
        "_rate",
        "_stamp",
        "_tokens",
        "_window_frames",
        "_window_start",
    )

    FLOOD_FACTOR = 5
    FLOOD_WINDOW = 10.0

    def __init__(self, rate: float, burst: int) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._stamp = time.monotonic()
        self._window_start = self._stamp
        self._window_frames = 0
        self._last_error = 0.0

    def allow(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        if now - self._window_start >= self.FLOOD_WINDOW:
            self._window_start, self._window_frames = now, 0
        self._window_frames += 1
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False

    @property
    def flooding(self) -> bool:
        limit = self._rate * self.FLOOD_FACTOR * self.FLOOD_WINDOW
        return self._window_frames > limit

    def should_report(self) -> bool:
        """At most one RATE_LIMIT error per second per connection."""
        now = time.monotonic()
        if now - self._last_error >= 1.0:
            self._last_error = now
            return True
        return False


@dataclass(frozen=True, slots=True)
class ConnectionHooks:
    """What connections tell the node's metrics: one instance shared by all of them."""

    on_slow_close: Callable[[], None] = lambda: None
    # Frames discarded at the send-queue bound: a fault (the client missed them live).
    on_drop: Callable[[int], None] = lambda frames: None
    # Frames not written because the socket was closing anyway (the client left, was
    # replaced, the node stops): not a fault; a client that comes back resumes them.
    on_unsent: Callable[[int], None] = lambda frames: None
    on_written: Callable[[float], None] = lambda seconds: None


NO_HOOKS = ConnectionHooks()


class Connection:
    """A device's socket. `send` never blocks: frames queue up to a byte bound.

    Past the bound the connection is closed with 1013 instead of growing: a slow
    consumer must not hold node memory or delay the other sockets (SPEC §4).

    Most sockets are idle most of the time, and a node holds thousands: the queue, its
    writer task and the event a paced replay waits on exist only while frames wait.
    """

    __slots__ = (
        "_closer",
        "_closing",
        "_direct_writes",
        "_drained",
        "_hooks",
        "_limit",
        "_over_bound",
        "_queue",
        "_queued",
        "_waiting_since",
        "_wire",
        "_writer",
        "conn_id",
        "connected_at",
        "device_id",
        "expires_at",
        "floor",
        "heard_at",
        "pinged",
        "session_id",
        "user_id",
    )

    def __init__(
        self,
        *,
        conn_id: str,
        user_id: str,
        device_id: str,
        session_id: str | None,
        queue_limit: int,
        expires_at: float = float("inf"),
        hooks: ConnectionHooks = NO_HOOKS,
    ) -> None:
        # The socket, once upgraded (`attach`); frames sent before are dropped.
        self._wire: Wire | None = None
        self.conn_id = conn_id
        self.user_id = user_id
        self.device_id = device_id
        self.session_id = session_id
        # The token's `exp` (epoch seconds): the node closes the socket then (1008).
        self.expires_at = expires_at
        # Logged frames with seq <= floor were sent before this connection joined.
        self.floor = 0
        self.connected_at = time.time()
        # Heartbeat (node.ws.timers.Heartbeat): when the peer last sent a frame, and whether
        # it has been pinged since.
        self.heard_at = time.monotonic()
        self.pinged = False
        self._limit = queue_limit
        # Frames waiting for the socket; None while nothing waits (and no writer runs).
        self._queue: deque[bytes] | None = None
        self._queued = 0
        self._writer: asyncio.Task[None] | None = None
        # Set when the queue empties or the connection closes; made by the first
        # paced replay that has to wait.
        self._drained: asyncio.Event | None = None
        self._closing = False
        self._over_bound = False
        self._closer: asyncio.Task[None] | None = None
        self._hooks = hooks
        self._direct_writes = 0
        # Delivery latency: when the queue last became non-empty; the hooks are told
        # (once per written batch, not per frame) how long that batch waited.
        self._waiting_since = 0.0

    @property
    def closing(self) -> bool:
        return self._closing

    def attach(self, wire: Wire) -> None:
        """Once the upgrade is done: frames go to this socket."""
        self._wire = wire

    def heard(self) -> None:
        """A frame came from the peer: it is alive."""
        self.heard_at = time.monotonic()
        self.pinged = False

    def ping(self) -> None:
        """Send a ping now, ahead of anything queued (control frames may interleave)."""
        self.pinged = True
        if self._wire is not None and not self._closing:
            self._wire.write(_PING, b"")

    def cut(self) -> None:
        """A silent peer would not read a close frame: drop the socket."""
        self._closing = True
        if self._wire is not None:
            self._wire.transport.abort()

    def send(self, frame: bytes) -> None:
        """Write or queue a text frame (its JSON); over the bound, close with 1013."""
        self.send_framed(text_frame(frame))

    def send_framed(self, frame: bytes) -> None:
        """`send` of a whole frame (common/wsframe.text_frame): a message to many
        sockets is framed once and the same bytes written to each."""
        if self._closing:
            self._hooks.on_unsent(1)
            return
        wire = self._wire
        if wire is None:
            self._hooks.on_unsent(1)
            return
        buffered = wire.transport.get_write_buffer_size()
        if not self._queue and buffered + len(frame) <= self._limit:
            # Nothing waits before it: straight into the socket, no task wake-up.
            wire.write_framed(frame)
            # These waited no time; 1 in 16 is observed, which keeps the latency
            # histogram's shape at a sixteenth of the cost per delivery.
            self._direct_writes += 1
            if self._direct_writes & 15 == 1:
                self._hooks.on_written(0.0)
            return
        self._queued += len(frame)
        if self._queued + buffered > self._limit:
            self._over_bound = True
            self._hooks.on_drop(1)
            self._hooks.on_slow_close()
            self.close(CloseCode.TRY_AGAIN, "slow consumer")
            return
        self._enqueue(frame)

    async def send_paced(self, frame: bytes) -> None:
        """Queue a frame once the queue is under half its bound (replays: no 1013 for those).

        It skips the direct path and the bound check: the writer task awaits the socket's
        flow control, and this waits for the writer, so a replay is paced, not cut.
        """
        while self._queued > self._limit // 2 and not self._closing:
            if self._drained is None:
                self._drained = asyncio.Event()
            self._drained.clear()
            await self._drained.wait()
        if self._closing:
            self._hooks.on_unsent(1)
            return
        framed = text_frame(frame)
        self._queued += len(framed)
        self._enqueue(framed)

    def _enqueue(self, frame: bytes) -> None:
        if self._queue is None:
            self._queue = deque()
        if not self._queue:
            self._waiting_since = time.perf_counter()
        self._queue.append(frame)
        if self._writer is None:
            self._writer = asyncio.create_task(
                self._write_queued(self._queue), name=f"writer-{self.conn_id}"
            )

    async def _write_queued(self, queue: deque[bytes]) -> None:
        """Write the queue out, then go: the next frame that must wait starts a new writer."""
        since = self._waiting_since
        wire = self._wire
        assert wire is not None  # only `send`/`send_paced` of an attached connection queue
        while queue:
            frame = queue.popleft()
            self._queued -= len(frame)
            wire.write_framed(frame)
            await wire.drain()
        # Nothing awaited since the queue was seen empty: a frame that waits from now
        # on finds no queue and no writer, and starts both again.
        self._queue = self._writer = None
        if self._drained is not None:
            self._drained.set()
        self._hooks.on_written(time.perf_counter() - since)

    def close(self, code: int, reason: str, *, wait_for_peer: bool = True) -> None:
        """Stop writing, then send a close frame (the peer has CLOSE_TIMEOUT to read it).

        Without `wait_for_peer` the connection ends once the close frame is sent,
        without reading the peer's answer (a flooder's would come behind its flood).
        """
        if self._closing:
            return
        self._stop_writing()
        self._closer = asyncio.create_task(
            self._close(code, reason, wait_for_peer), name=f"close-{self.conn_id}"
        )

    async def _close(self, code: int, reason: str, wait_for_peer: bool) -> None:
        wire = self._wire
        if wire is None:
            return
        wire.write_close(code, reason)
        if not wait_for_peer:
            wire.transport.close()  # after what is written, the close frame included
        try:
            # The peer answers with its close frame once it has read everything
            # written before ours; then the transport flushes and closes. (Without
            # waiting for that answer: until the close frame is flushed.)
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await wire.wait_peer_closed()
        except TimeoutError:
            wire.transport.abort()
        else:
            wire.transport.close()

    def closed_by_peer(self, answer: int = 1000) -> None:
        """The peer sent a close frame first: answer it (`answer`: 1002 for a close code
        no peer may send) and close (nothing more is sent)."""
        if self._closing:
            return
        self._stop_writing()
        if self._wire is not None:
            self._wire.write_close(answer, "")
            self._wire.transport.close()

    def end(self) -> None:
        """The node stops: a close frame unless one went out, then the transport closes
        once what was written is sent (the peer reads its 1001, then the end)."""
        if not self._closing:
            self._stop_writing()
            if self._wire is not None:
                self._wire.write_close(CloseCode.GOING_AWAY, "node shutting down")
        if self._wire is not None:
            self._wire.transport.close()

    def _stop_writing(self) -> None:
        """Closing: what still waits is dropped (counted), a paced replay released."""
        self._closing = True
        if self._queue:
            if self._over_bound:
                self._hooks.on_drop(len(self._queue))
            else:
                self._hooks.on_unsent(len(self._queue))
            self._queue.clear()
        if self._drained is not None:
            self._drained.set()
        if self._writer is not None:
            self._writer.cancel()

    async def stop(self) -> None:
        """Cancel and await the owned tasks (called once the socket is done)."""
        self._closing = True
        for task in (self._writer, self._closer):
            if task is None:
                continue
            if task is self._writer:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
