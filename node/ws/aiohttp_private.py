"""PRIVATE API of aiohttp: every use the node makes of aiohttp internals, in one place.

Depends on aiohttp==3.14.5 (pinned in pyproject.toml) beyond its documented API; an
upgrade reviews this file and runs tests/transport/test_aiohttp_private.py, which checks the
behaviour relied on, not just the names (end to end: tests/abuse/test_abuse_ws_frames.py,
frames sent behind the upgrade request). What it relies on:

- `WebSocketReader` (aiohttp.http, undocumented) parses frames and, synchronously inside
  its own `feed_data(data)`, hands each message to its queue's `feed_data(message,
  size)` and a parse failure to the queue's `set_exception(exc)` (a `WebSocketError`
  carrying the close code); after a failure it ignores what follows. The queue must be a
  `WebSocketDataQueue` (aiohttp._websocket.reader): the compiled reader types it so.
  The reader stalls while `queue._size > queue._limit`: a queue made with limit 0 that
  counts nothing never stalls it.
- `request.protocol` is aiohttp's `RequestHandler`: with its `transport` cleared, its
  `connection_lost(None)` lets go of the socket without closing it, and the request
  ends as if the client had left.
- `RequestHandler.force_close()` closes the connection once the response in hand is
  written, instead of keeping it alive or lingering to read the rest of a body.
- Bytes the client sent after its upgrade request wait in the handler's
  `_message_tail`, unparsed, until `WebSocketResponse.prepare` hands them to aiohttp's
  own reader (`RequestHandler.set_parser`), which queues their messages on the
  response (`WebSocketResponse._reader`), where a take-over would never read them.

Why at all: a socket left to aiohttp holds its request, handler, parser, tasks and
coroutines for its whole life; taken over it holds the transport, a reader and the
node's objects (README "Benchmarks": idle memory per connection).
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol, cast

from aiohttp import WSMessage, web
from aiohttp._websocket.reader import WebSocketDataQueue
from aiohttp.http import WebSocketError, WebSocketReader


class FrameReader(Protocol):
    """aiohttp's frame parser, as the node uses it."""

    def feed_data(self, data: bytes) -> tuple[bool, bytes]: ...


class MessageRelay(WebSocketDataQueue):
    """A reader's queue that keeps nothing: each message goes to `message` as it is parsed.

    Subclasses say what a message and a failure mean. One relay may serve many readers
    (the reader calls it synchronously, so the caller knows which reader is feeding).
    """

    def __init__(self) -> None:
        # The protocol, limit and loop serve a queue that buffers and counts; this one
        # does neither, and with limit 0 and nothing counted the reader never stalls.
        super().__init__(cast(Any, None), 0, loop=asyncio.get_running_loop())

    def feed_data(self, data: Any, size: int) -> None:
        self.message(data)

    def set_exception(self, exc: BaseException, exc_cause: Any = None) -> None:
        self.error(exc)

    def feed_eof(self) -> None:
        pass

    def message(self, msg: WSMessage) -> None:
        """A parsed message (type, data, extra); text comes decoded."""

    def error(self, exc: BaseException) -> None:
        """The stream cannot be parsed; `close_code_of(exc)` says how to close."""


def frame_reader(relay: MessageRelay, max_msg_size: int) -> FrameReader:
    """A parser of client frames (no compression, text decoded) that feeds `relay`."""
    reader: FrameReader = WebSocketReader(relay, max_msg_size, compress=False, decode_text=True)
    return reader


def stream_error(code: int, message: str) -> Exception:
    """A failure of the stream that `close_code_of` closes with `code`."""
    return WebSocketError(code, message)


def close_code_of(exc: BaseException) -> int:
    """The close code for a stream that failed to parse (1009 too big, 1002, 1007...)."""
    if isinstance(exc, WebSocketError):
        return int(exc.code)
    return 1011


def take_upgrade_tail(request: web.Request) -> bytes:
    """The bytes the client sent after its upgrade request, which aiohttp has not parsed.

    They are the caller's from now on: aiohttp's reader will not see them. Call it
    just before `WebSocketResponse.prepare` (which hands the tail to aiohttp's reader):
    until then aiohttp appends every read to the tail, and `prepare` does not yield to
    the loop before it sets its parser, so aiohttp is left nothing to parse.
    """
    handler = request.protocol
    tail: bytes = handler._message_tail
    handler._message_tail = b""
    return tail


def queued_by_aiohttp(ws: web.WebSocketResponse) -> list[Any]:
    """Messages aiohttp's own reader has parsed for the response and nobody has read."""
    queue = ws._reader
    if queue is None:
        return []
    return [message for message, _ in queue._buffer]


def close_after_response(request: web.Request) -> None:
    """Close the request's connection once the response in hand is written: no keep-alive,
    and no lingering to read what is left of an unread body."""
    request.protocol.force_close()


def release_request(request: web.Request) -> None:
    """Make aiohttp's request handler let go of its socket without closing it.

    Call it once the transport has its new protocol. From then on aiohttp's request
    ends as if the client had left, and the handler's return value is written nowhere;
    the handler's task goes on (aiohttp's default `handler_cancellation=False`).
    """
    handler = request.protocol
    handler.transport = None  # so that connection_lost does not close it
    handler.connection_lost(None)
