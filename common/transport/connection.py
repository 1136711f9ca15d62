"""A lean pipelined Redis connection: commands written as they come, replies matched in order.

redis-py spends more time per command than Redis does (a pooled connection, a retry
wrapper, a timeout context, pipeline bookkeeping). The node and the worker send many
small commands from many tasks; here they share one connection: each command is
packed once, the commands of a loop turn leave in one write, and hiredis parses the
replies, which Redis sends in command order, so each resolves the oldest waiter.

Failure: when the connection drops, every command in flight fails with
`ConnectionError` (the caller decides whether to retry: enqueues and deliveries are
idempotent downstream) and the next command reconnects. A reply that does not come
within `reply_timeout` (a frozen link) drops the connection the same way.

What it borrows of redis-py beyond its documented API (error classes, URL parsing) is
in common/transport/redis_private.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection
from redis.commands.core import AsyncScript as Script
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

from common.transport.redis_private import error_from_reply, url_settings

# Seconds the oldest command may wait for its reply before the link counts as frozen.
REPLY_TIMEOUT = 10.0
# Commands queued or awaiting replies at once. Past it a command fails at once
# (ConnectionError: the caller answers UNAVAILABLE or retries later) instead of
# queueing without bound behind a Redis that has stopped answering.
MAX_IN_FLIGHT = 50_000
CONNECT_TIMEOUT = 5.0
# Seconds `close` lets commands in flight finish.
CLOSE_WAIT = 2.0


def pack(*args: bytes | str | int | float) -> bytes:
    """One command in RESP."""
    return b"*%d\r\n%s" % (len(args), pack_args(args))


def pack_args(args: Iterable[bytes | str | int | float]) -> bytes:
    """Arguments in RESP, without the command's header: a part of a command that
    `command` puts together with parts encoded by other means."""
    out = []
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        else:
            data = repr(arg).encode() if isinstance(arg, float) else b"%d" % arg
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def command(count: int, parts: Iterable[bytes]) -> bytes:
    """A command of `count` arguments from parts already in RESP (`pack_args`)."""
    return b"*%d\r\n%s" % (count, b"".join(parts))


def address_of(redis: aioredis.Redis) -> dict[str, Any]:
    """Where a redis-py client connects, and how (for a connection of our own beside it)."""
    pool = redis.connection_pool
    kwargs = pool.connection_kwargs
    return {
        "host": kwargs.get("host", "127.0.0.1"),
        "port": kwargs.get("port", 6379),
        "path": kwargs.get("path") if pool.connection_class is UnixDomainSocketConnection else None,
        "tls": issubclass(pool.connection_class, SSLConnection),
        "db": kwargs.get("db", 0),
        "username": kwargs.get("username"),
        "password": kwargs.get("password"),
    }


def address_from_url(url: str) -> dict[str, Any]:
    """The same description, from a redis:// rediss:// or unix:// URL."""
    return url_settings(url)


async def open_transport(address: dict[str, Any], protocol: asyncio.Protocol) -> None:
    """Connect `protocol` to the address (unix socket, TCP, or TCP with TLS)."""
    loop = asyncio.get_running_loop()
    if address.get("path"):
        await loop.create_unix_connection(lambda: protocol, address["path"])
    else:
        tls = ssl.create_default_context() if address.get("tls") else None
        await loop.create_connection(lambda: protocol, address["host"], address["port"], ssl=tls)


def auth_command(address: dict[str, Any]) -> bytes | None:
    """The AUTH to send first on a new connection, if the address has a password."""
    if not address.get("password"):
        return None
    if address.get("username"):
        return pack("AUTH", address["username"], address["password"])
    return pack("AUTH", address["password"])


@contextlib.asynccontextmanager
async def command_connection(
    redis: aioredis.Redis, *, cluster: bool
) -> AsyncIterator[RespConnection | None]:
    """A process's shared command connection beside its redis-py client, closed on exit.

    None for a Redis Cluster: there the cluster client routes every command by slot.
    """
    if cluster:
        yield None
        return
    connection = RespConnection(address_of(redis))
    try:
        yield connection
    finally:
        await connection.close()


async def run_script(
    connection: RespConnection,
    script: Script,
    keys: Sequence[bytes | str],
    args: Sequence[bytes | str | int | float],
) -> Any:
    """EVALSHA a redis-py registered script on the connection, loading it if Redis lost it."""
    try:
        return await connection.call("EVALSHA", script.sha, len(keys), *keys, *args)
    except NoScriptError:
        # Redis restarted or flushed its scripts: the script did not run; load it, again.
        await load_script(connection, script)
        return await connection.call("EVALSHA", script.sha, len(keys), *keys, *args)


async def load_script(connection: RespConnection, script: Script) -> None:
    """SCRIPT LOAD a redis-py registered script (after an EVALSHA's NoScriptError)."""
    body = script.script
    await connection.call("SCRIPT", "LOAD", body if isinstance(body, str | bytes) else bytes(body))


class _Protocol(asyncio.Protocol):
    def __init__(self, owner: RespConnection) -> None:
        self._owner = owner
        self._reader = hiredis.Reader()
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            self._owner._on_reply(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        self._owner._on_lost(self)


class RespConnection:
    """One pipelined connection; `submit` a command, await its future."""

    def __init__(
        self,
        address: dict[str, Any],
        *,
        reply_timeout: float = REPLY_TIMEOUT,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        self._address = address
        self._reply_timeout = reply_timeout
        self._max_in_flight = max_in_flight
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._waiting: deque[asyncio.Future[Any]] = deque()
        self._unsent: list[tuple[bytes, asyncio.Future[Any]]] = []
        self._flush_scheduled = False
        self._watchdog: asyncio.TimerHandle | None = None
        self._progress_at = 0.0
        self.writes = 0

    async def call(self, *args: bytes | str | int | float) -> Any:
        """Run one command; its reply, or its error raised."""
        return await self.submit(*args)

    def submit(self, *args: bytes | str | int | float) -> asyncio.Future[Any]:
        """Queue one command; a future of its reply (a Redis error is set as its exception)."""
        return self.submit_packed(pack(*args))

    def submit_packed(self, data: bytes) -> asyncio.Future[Any]:
        """`submit` of a command already in RESP (`pack`, `command`)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()
        if len(self._waiting) + len(self._unsent) >= self._max_in_flight:
            done.set_exception(RedisConnectionError("too many redis commands in flight"))
            return done
        self._unsent.append((data, done))
        if not self._flush_scheduled:
            # Not at once: the commands of this loop turn leave in one write.
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return done

    async def close(self) -> None:
        """Let the commands in flight finish (at most CLOSE_WAIT s), then close the connection."""
        with contextlib.suppress(Exception):
            pending = [f for _, f in self._unsent] + list(self._waiting)
            if pending:
                # Bounded well inside a drain: a stop must not wait out a frozen link.
                await asyncio.wait(pending, timeout=min(self._reply_timeout, CLOSE_WAIT))
        if self._connecting is not None:
            self._connecting.cancel()
            with contextlib.suppress(BaseException):
                await self._connecting
        proto, self._proto = self._proto, None
        if proto is not None and proto.transport is not None:
            proto.transport.close()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(proto.lost), 1.0)
        self._fail_all(RedisConnectionError("connection closed"))

    # -- writing ----------------------------------------------------------------------------
    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._unsent:
            return
        proto = self._proto
        if proto is None or proto.transport is None or proto.transport.is_closing():
            if self._connecting is None:
                self._connecting = asyncio.create_task(self._connect(), name="redis-connect")
            return  # sent once connected
        batch, self._unsent = self._unsent, []
        proto.transport.write(b"".join(data for data, _ in batch))
        self.writes += 1
        idle = not self._waiting
        self._waiting.extend(done for _, done in batch)
        if idle:
            # The wait starts now; while older commands still wait, only replies count.
            self._arm_watchdog()

    async def _connect(self) -> None:
        try:
            self._proto = await asyncio.wait_for(self._open(), CONNECT_TIMEOUT)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Nothing was sent: the waiting commands fail now, the next one tries again.
            self._fail_unsent(RedisConnectionError(f"cannot connect to redis: {exc!r}"))
        finally:
            self._connecting = None
        if self._unsent:
            self._flush()

    async def _open(self) -> _Protocol:
        a = self._address
        proto = _Protocol(self)
        await open_transport(a, proto)
        # The handshake goes first in the same stream; its replies are awaited here.
        setup: list[asyncio.Future[Any]] = []
        auth = auth_command(a)
        if auth is not None:
            setup.append(self._direct(proto, auth))
        if a.get("db"):
            setup.append(self._direct(proto, pack("SELECT", a["db"])))
        try:
            for reply in setup:
                await reply
        except BaseException:
            proto.transport.close()
            raise
        return proto

    def _direct(self, proto: _Protocol, command: bytes) -> asyncio.Future[Any]:
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        proto.transport.write(command)
        self._waiting.append(done)
        return done

    # -- replies ----------------------------------------------------------------------------
    def _on_reply(self, reply: Any) -> None:
        if not self._waiting:
            return  # a reply to a command whose connection we already gave up
        done = self._waiting.popleft()
        if not done.done():
            if isinstance(reply, hiredis.ReplyError):
                done.set_exception(error_from_reply(str(reply)))
            else:
                done.set_result(reply)
        self._arm_watchdog()

    def _arm_watchdog(self) -> None:
        # One timer per connection, not one per command: each reply only stamps the
        # time of progress; the timer, when it fires, checks whether replies stopped.
        self._progress_at = asyncio.get_running_loop().time()
        if self._watchdog is None and self._waiting:
            self._watchdog = asyncio.get_running_loop().call_later(
                self._reply_timeout, self._check_progress
            )

    def _check_progress(self) -> None:
        self._watchdog = None
        if not self._waiting:
            return
        silent = asyncio.get_running_loop().time() - self._progress_at
        if silent >= self._reply_timeout:
            self._frozen()
        else:
            self._watchdog = asyncio.get_running_loop().call_later(
                self._reply_timeout - silent, self._check_progress
            )

    def _frozen(self) -> None:
        proto = self._proto
        if proto is not None and proto.transport is not None:
            proto.transport.abort()  # connection_lost fails what waits

    def _on_lost(self, proto: _Protocol) -> None:
        if self._proto is proto:
            self._proto = None
        self._fail_waiting(RedisConnectionError("redis connection lost"))
        if self._unsent and not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _fail_waiting(self, exc: Exception) -> None:
        waiting, self._waiting = self._waiting, deque()
        for done in waiting:
            if not done.done():
                done.set_exception(exc)
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def _fail_unsent(self, exc: Exception) -> None:
        unsent, self._unsent = self._unsent, []
        for _, done in unsent:
            if not done.done():
                done.set_exception(exc)

    def _fail_all(self, exc: Exception) -> None:
        self._fail_waiting(exc)
        self._fail_unsent(exc)
