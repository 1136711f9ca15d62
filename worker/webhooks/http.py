"""POSTs to the one webhook URL over kept-alive HTTP/1.1 connections: a lean client.

The dispatcher runs on the chat worker's event loop and sends every event (about 2.4
per chat: the user's message, the reply, a session change), so the client's CPU per
POST is the chat path's too. aiohttp's client cost ≈175 µs of it per POST, most of it
request and response objects the dispatcher never looks at (issue 17, target 6); this
writes the request in one piece and reads the status line and headers.

What it does: `Content-Length` bodies; keep-alive unless the answer says `close` or is
not HTTP/1.1; an answer's body is read (and dropped) when it has a `Content-Length` of
at most ANSWER_READ bytes, otherwise the connection is closed instead of read (as
aiohttp does with a body left unread). A kept connection the receiver closed meanwhile
is noticed when the answer does not start, and the request goes once more on a fresh
one (a receiver may then see the event twice; webhooks are at least once anyway).
Redirects are not followed: a 3xx is a failed attempt like any other non-2xx.
"""

from __future__ import annotations

import asyncio
import ssl

from yarl import URL

from common.httphead import parse_response_head

# Bytes of an answer's body read so its connection can be reused; a longer one closes it.
ANSWER_READ = 4096
# The longest status line and headers of an answer.
HEAD_LIMIT = 65536

_Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class HookError(Exception):
    """The receiver's answer was not HTTP as this client reads it, or was cut short."""


class HookClient:
    """POSTs to `url`; at most `keep` idle connections are kept."""

    def __init__(self, url: str, *, keep: int) -> None:
        parsed = URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.raw_host:
            raise ValueError(f"not an http(s) URL: {url}")
        self._host = parsed.raw_host
        self._port = parsed.port or (443 if parsed.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if parsed.scheme == "https" else None
        host = parsed.host_port_subcomponent or self._host
        self._head = f"POST {parsed.raw_path_qs or '/'} HTTP/1.1\r\nHost: {host}\r\n".encode()
        self._keep = keep
        self._idle: list[_Connection] = []

    async def post(self, body: bytes, headers: dict[str, str]) -> int:
        """Send `body` with `headers` (and its length); the answer's status code.

        Raises OSError (connecting, sending, TLS) or HookError; the caller bounds the time.
        """
        fields = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        request = b"".join(
            (self._head, fields.encode("latin-1"), b"Content-Length: %d\r\n\r\n" % len(body), body)
        )
        while self._idle:
            try:
                return await self._exchange(self._idle.pop(), request, reused=True)
            except _Stale:
                continue  # closed by the receiver while idle: try the next, or a new one
        connection = await asyncio.open_connection(
            self._host, self._port, ssl=self._ssl, limit=HEAD_LIMIT
        )
        return await self._exchange(connection, request, reused=False)

    def close(self) -> None:
        """Close the idle connections (those in use close when their exchange ends)."""
        while self._idle:
            self._idle.pop()[1].close()

    async def _exchange(self, connection: _Connection, request: bytes, *, reused: bool) -> int:
        reader, writer = connection
        keep = False
        try:
            writer.write(request)
            try:
                head = await reader.readuntil(b"\r\n\r\n")
                while head.startswith(b"HTTP/1.1 1"):  # an interim answer: the real one follows
                    head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                if reused and not exc.partial:
                    raise _Stale from exc
                raise HookError("the connection closed before the answer ended") from exc
            except asyncio.LimitOverrunError as exc:
                raise HookError("the answer's headers are too long") from exc
            status, length, keep = _parse_head(head)
            if length is None or length > ANSWER_READ:
                keep = False  # a body this client does not read: the connection goes
            elif length:
                try:
                    await reader.readexactly(length)
                except asyncio.IncompleteReadError as exc:
                    raise HookError("the connection closed before the answer ended") from exc
            return status
        finally:
            if keep and len(self._idle) < self._keep:
                self._idle.append(connection)
            else:
                writer.close()


class _Stale(Exception):
    """A kept connection was closed by the receiver before this request's answer began."""


def _parse_head(head: bytes) -> tuple[int, int | None, bool]:
    """(status, body length or None if not known up front, keep the connection)."""
    try:
        answer = parse_response_head(head)
    except ValueError as exc:
        raise HookError(str(exc)) from exc
    fields = answer.headers
    keep = answer.version == "HTTP/1.1" and fields.get("connection", "").lower() != "close"
    length: int | None = None
    if answer.status in (204, 304):
        length = 0
    elif "transfer-encoding" not in fields and (declared := fields.get("content-length")):
        if not declared.isdigit():
            raise HookError(f"a bad Content-Length: {declared[:40]!r}")
        length = int(declared)
    return answer.status, length, keep
