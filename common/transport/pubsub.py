"""A lean Redis pub/sub subscriber: one connection, batched (P)SUBSCRIBE, auto-reconnect.

It is written on asyncio's Protocol and hiredis rather than redis-py's PubSub because
the node needs three things that one hides: messages handed over synchronously as
they are parsed (no queue, no task per message), subscription confirmations it can
await (so `welcome.last_seq` is read only once the channel is live), and a hook
after each reconnect (so the node can repair the gap it may have missed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from functools import partial
from typing import Any, Protocol

import hiredis

from common.backoff import Backoff
from common.transport.connection import address_from_url, auth_command, open_transport, pack

log = logging.getLogger("fanout.pubsub")

MessageHandler = Callable[[bytes, bytes], None]
Publisher = Callable[[bytes, bytes], Awaitable[Any]]
# Reconnect pacing (common/backoff.py): seconds of the first retry's ceiling, and its cap.
RECONNECT_FIRST = 0.05
RECONNECT_CAP = 5.0


def _resolve(waiter: asyncio.Future[None], _: object) -> None:
    if not waiter.done():
        waiter.set_result(None)


class ChannelSubscriber(Protocol):
    """What the node needs of a subscriber (one connection, or one per cluster shard)."""

    async def subscribe(self, channels: Iterable[bytes]) -> None: ...

    def unsubscribe(self, channels: Iterable[bytes]) -> None: ...

    async def psubscribe(self, pattern: bytes) -> None: ...


class _Protocol(asyncio.Protocol):
    def __init__(self, owner: Subscriber) -> None:
        self._owner = owner
        self._reader = hiredis.Reader()
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport
        self.lost: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        handle = self._owner._on_reply
        while (reply := self._reader.gets()) is not False:
            handle(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


class Subscriber:
    """Owns one pub/sub connection and the set of channels and patterns it should hold.

    `on_message(channel, data)` runs inside the read callback: it must not block.
    `on_resubscribed()` runs after a reconnect has restored every subscription.
    """

    def __init__(
        self,
        url: str,
        on_message: MessageHandler,
        *,
        on_resubscribed: Callable[[], None] | None = None,
        ping_interval: float = 5.0,
        sharded: bool = False,
        probe: tuple[bytes, Publisher] | None = None,
    ) -> None:
        self._address = address_from_url(url)
        self._on_message = on_message
        self._on_resubscribed = on_resubscribed
        self._ping_interval = ping_interval
        # (channel, publish): a loop-back probe through a channel of our own.
        self._probe = probe
        self._sharded = sharded
        self._sub_cmd, self._unsub_cmd = (
            (b"SSUBSCRIBE", b"SUNSUBSCRIBE") if sharded else (b"SUBSCRIBE", b"UNSUBSCRIBE")
        )
        self._channels: set[bytes] = {probe[0]} if probe is not None else set()
        self._patterns: dict[bytes, asyncio.Future[None]] = {}
        self._pending: dict[bytes, list[asyncio.Future[None]]] = {}
        self._inflight: dict[bytes, deque[list[asyncio.Future[None]]]] = {}
        self._unsub_pending: set[bytes] = set()
        self._flush_scheduled = False
        self._proto: _Protocol | None = None
        self._connected = asyncio.Event()
        self._pong = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.reconnects = 0

    # -- lifecycle ------------------------------------------------------------------------
    async def __aenter__(self) -> Subscriber:
        self._task = asyncio.create_task(self._run(), name="pubsub")
        await asyncio.wait_for(self._connected.wait(), timeout=30)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._proto and self._proto.transport:
            self._proto.transport.close()
        for futures in [*self._pending.values(), *(f for q in self._inflight.values() for f in q)]:
            for fut in futures:
                if not fut.done():
                    fut.cancel()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # -- subscriptions --------------------------------------------------------------------
    async def subscribe(self, channels: Iterable[bytes]) -> None:
        """Subscribe (batched with other calls in the same loop turn); returns once live."""
        loop = asyncio.get_running_loop()
        waits = []
        for channel in channels:
            self._channels.add(channel)
            self._unsub_pending.discard(channel)
            fut: asyncio.Future[None] = loop.create_future()
            self._pending.setdefault(channel, []).append(fut)
            waits.append(fut)
        self._schedule_flush()
        if waits:
            await asyncio.gather(*waits)

    def unsubscribe(self, channels: Iterable[bytes]) -> None:
        """Drop channels; confirmation is not awaited."""
        for channel in channels:
            self._channels.discard(channel)
            if channel not in self._pending:
                self._unsub_pending.add(channel)
        self._schedule_flush()

    async def psubscribe(self, pattern: bytes) -> None:
        """Subscribe to a pattern; returns once live."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._patterns[pattern] = fut
        if self._connected.is_set():
            self._write(pack(b"PSUBSCRIBE", pattern))
        await fut

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._connected.is_set():
            return  # the reconnect restores everything in `_channels` and `_pending`
        if self._unsub_pending:
            self._write(self._batch(self._unsub_cmd, self._unsub_pending))
            self._unsub_pending.clear()
        if self._pending:
            pending, self._pending = self._pending, {}
            for channel, futures in pending.items():
                self._inflight.setdefault(channel, deque()).append(futures)
            self._write(self._batch(self._sub_cmd, pending))

    def _batch(self, command: bytes, channels: Iterable[bytes]) -> bytes:
        """One command for all channels; sharded: one per channel (a command may not span
        slots), still written at once."""
        if self._sharded:
            return b"".join(pack(command, channel) for channel in channels)
        return pack(command, *channels)

    def _write(self, data: bytes) -> None:
        transport = self._proto.transport if self._proto is not None else None
        if transport is not None and not transport.is_closing():
            transport.write(data)

    # -- replies --------------------------------------------------------------------------
    def _on_reply(self, reply: Any) -> None:
        if not isinstance(reply, list):
            if isinstance(reply, hiredis.ReplyError):
                log.error("redis pub/sub error: %s", reply)
            elif reply == b"PONG":
                # A PING before the first SUBSCRIBE gets the plain reply, not the
                # subscribed-mode [pong, ""]: dropping it made every subscriber without a
                # probe channel (the node's control channel) reconnect once at start.
                self._pong.set()
            return
        kind = reply[0]
        if kind == b"message" or kind == b"smessage":
            if self._probe is not None and reply[1] == self._probe[0]:
                self._pong.set()
                return
            self._on_message(reply[1], reply[2])
        elif kind == b"pmessage":
            self._on_message(reply[2], reply[3])
        elif kind == b"subscribe" or kind == b"ssubscribe":
            queue = self._inflight.get(reply[1])
            if queue:
                for fut in queue.popleft():
                    if not fut.done():
                        fut.set_result(None)
                if not queue:
                    del self._inflight[reply[1]]
        elif kind == b"psubscribe":
            waiter = self._patterns.get(reply[1])
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        elif kind == b"pong":
            self._pong.set()

    # -- connection -----------------------------------------------------------------------
    async def _connect(self) -> _Protocol:
        proto = _Protocol(self)
        await open_transport(self._address, proto)
        auth = auth_command(self._address)
        if auth is not None:
            assert proto.transport is not None
            proto.transport.write(auth)
        return proto

    async def _run(self) -> None:
        backoff = Backoff(first=RECONNECT_FIRST, cap=RECONNECT_CAP)
        while True:
            try:
                self._proto = await asyncio.wait_for(self._connect(), timeout=5)
                live = self._restore()
                resumed = self.reconnects > 0
                # On a reconnect, the gap repair may start only once every channel is live
                # again: a repair that read the log earlier could miss what came between.
                if not await self._confirmed(live, self._proto):
                    raise ConnectionResetError("dropped while resubscribing")
            except (OSError, TimeoutError) as exc:
                self._connected.clear()
                delay = backoff.next_delay()
                log.warning("redis pub/sub connect failed (%s); retrying in %.2fs", exc, delay)
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            if resumed and self._on_resubscribed is not None:
                self._on_resubscribed()
            await self._watch(self._proto)
            self._connected.clear()
            self.reconnects += 1
            log.warning("redis pub/sub connection lost; reconnecting")

    def _restore(self) -> list[asyncio.Future[None]]:
        """After (re)connecting: subscribe every wanted channel and pattern again.

        Returns futures that resolve as Redis confirms each of them.
        """
        loop = asyncio.get_running_loop()
        for channel, queue in self._inflight.items():
            for futures in queue:
                self._pending.setdefault(channel, []).extend(futures)
        self._inflight.clear()
        live: list[asyncio.Future[None]] = []
        for channel in self._channels:
            fut: asyncio.Future[None] = loop.create_future()
            self._pending.setdefault(channel, []).append(fut)
            live.append(fut)
        for channel in [c for c in self._pending if c not in self._channels]:
            for fut in self._pending.pop(channel):
                if not fut.done():
                    fut.set_result(None)  # unsubscribed meanwhile: nothing to wait for
        self._unsub_pending.clear()
        self._flush_scheduled = False
        self._connected.set()
        self._flush()
        for pattern in self._patterns:
            confirmed: asyncio.Future[None] = loop.create_future()
            earlier = self._patterns[pattern]
            if not earlier.done():
                confirmed.add_done_callback(partial(_resolve, earlier))
            self._patterns[pattern] = confirmed
            live.append(confirmed)
            self._write(pack(b"PSUBSCRIBE", pattern))
        return live

    async def _confirmed(self, live: list[asyncio.Future[None]], proto: _Protocol) -> bool:
        """Wait for the confirmations; False if the connection dropped (or hung) first."""
        if not live:
            return True
        # Not cancelled on failure: the futures move to the next attempt and resolve then.
        everything = asyncio.gather(*live, return_exceptions=True)
        done, _ = await asyncio.wait(
            [everything, proto.lost], timeout=30, return_when=asyncio.FIRST_COMPLETED
        )
        if everything in done:
            return True
        if proto.transport is not None:
            proto.transport.abort()
        return False

    async def _watch(self, proto: _Protocol) -> None:
        """Return when the connection drops, or when a probe does not come back in time.

        The probe is a message published (over another connection) to a channel only
        this subscriber holds: it proves the subscription itself still delivers, which
        a TCP keepalive or a PING on this connection alone would not. Without a
        publisher, or while publishing fails, a PING stands in.
        """
        while not proto.lost.done():
            self._pong.clear()
            await self._send_probe()
            pong: asyncio.Future[Any] = asyncio.ensure_future(self._pong.wait())
            try:
                done, _ = await asyncio.wait(
                    [pong, proto.lost],
                    timeout=self._ping_interval * 2,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                pong.cancel()
            if proto.lost.done():
                return
            if pong not in done:
                log.warning("redis pub/sub probe unanswered; dropping the connection")
                if proto.transport is not None:
                    proto.transport.abort()
                await proto.lost
                return
            await asyncio.wait([proto.lost], timeout=self._ping_interval)

    async def _send_probe(self) -> None:
        if self._probe is not None:
            try:
                await asyncio.wait_for(
                    self._probe[1](self._probe[0], b"probe"), self._ping_interval
                )
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the command connection is down, not necessarily ours
                log.debug("pub/sub probe publish failed (%s); sending PING", exc)
        self._write(pack(b"PING"))
