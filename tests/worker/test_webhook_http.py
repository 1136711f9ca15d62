"""The webhook dispatcher's HTTP client (worker/webhooks/http.py) against loopback servers."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from worker.webhooks.http import HookClient, HookError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _serve(handler: Handler) -> AsyncIterator[tuple[str, set[object]]]:
    """An aiohttp receiver at /hook; its URL and the peers (client ports) it saw."""
    peers: set[object] = set()

    async def receive(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        peers.add(request.transport.get_extra_info("peername"))
        return await handler(request)

    app = web.Application()
    app.router.add_post("/hook", receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/hook?k=v", peers
    finally:
        await runner.cleanup()


async def test_posts_body_and_headers_and_keeps_the_connection() -> None:
    seen: list[tuple[str, str, bytes]] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(
            (request.query_string, request.headers["Fanout-Event-Id"], await request.read())
        )
        return web.Response(status=204)

    async for url, peers in _serve(handler):
        http = HookClient(url, keep=4)
        for i in range(3):
            assert await http.post(b'{"n": %d}' % i, {"Fanout-Event-Id": str(i)}) == 204
        http.close()
        assert seen == [("k=v", str(i), b'{"n": %d}' % i) for i in range(3)]
        assert len(peers) == 1, "one kept-alive connection"


async def test_statuses_come_back_as_they_are_and_redirects_are_not_followed() -> None:
    statuses = iter([500, 302, 200])

    async def handler(request: web.Request) -> web.StreamResponse:
        status = next(statuses)
        headers = {"Location": "/elsewhere"} if status == 302 else {}
        return web.Response(status=status, text="x" * 10, headers=headers)

    async for url, peers in _serve(handler):
        http = HookClient(url, keep=4)
        assert [await http.post(b"{}", {}) for _ in range(3)] == [500, 302, 200]
        http.close()
        assert len(peers) == 1


async def test_a_long_or_chunked_answer_closes_its_connection_unread() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Kind") == "long":
            return web.Response(status=200, body=b"x" * 100_000)
        resp = web.StreamResponse(status=200)
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b"chunk")
        return resp

    async for url, peers in _serve(handler):
        http = HookClient(url, keep=4)
        assert await http.post(b"{}", {"Kind": "long"}) == 200
        assert await http.post(b"{}", {"Kind": "chunked"}) == 200
        assert await http.post(b"{}", {"Kind": "long"}) == 200
        http.close()
        assert len(peers) == 3, "none of them was reused"


async def _raw_server(answer: Callable[[int], bytes]) -> AsyncIterator[tuple[str, list[int]]]:
    """A server that reads one request per connection, writes `answer(n)` and closes."""
    served: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        served.append(len(served))
        writer.write(answer(len(served)))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/", served
    finally:
        server.close()
        await server.wait_closed()


async def test_a_kept_connection_closed_by_the_receiver_is_replaced() -> None:
    # Each answer claims keep-alive, then the server closes: the next POST finds the
    # kept connection dead before its answer begins and goes again on a new one.
    async for url, served in _raw_server(lambda n: b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"):
        http = HookClient(url, keep=4)
        assert await http.post(b"{}", {}) == 200
        await asyncio.sleep(0.05)  # the close reaches the client
        assert await http.post(b"{}", {}) == 200
        http.close()
        assert len(served) == 2


async def test_an_answer_that_is_not_http_or_is_cut_short_is_an_error() -> None:
    answers = {1: b"SMTP ready\r\n\r\n", 2: b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"}
    async for url, _ in _raw_server(lambda n: answers[n]):
        http = HookClient(url, keep=4)
        with pytest.raises(HookError):
            await http.post(b"{}", {})
        with pytest.raises(HookError):
            await http.post(b"{}", {})
        http.close()


async def test_a_refused_connection_is_an_os_error_the_dispatcher_reports() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(ConnectionRefusedError):
        await HookClient(f"http://127.0.0.1:{port}/", keep=1).post(b"{}", {})


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for localhost (and its key) that no default trust store knows."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    request = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    names = ["-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"]
    subprocess.run(
        [*request, *names, "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


async def _serve_tls(cert: Path, key: Path, got: list[bytes]) -> AsyncIterator[str]:
    async def receive(request: web.Request) -> web.StreamResponse:
        got.append(await request.read())
        return web.Response(status=204)

    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    app = web.Application()
    app.router.add_post("/hook", receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    try:
        yield f"https://localhost:{runner.addresses[0][1]}/hook"
    finally:
        await runner.cleanup()


async def test_https_receivers_are_reached_over_verified_tls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Receivers are https in production: the client speaks TLS and verifies the
    # certificate against the default trust store (here made to hold the test's own).
    cert, key = _self_signed(tmp_path)
    got: list[bytes] = []
    async for url in _serve_tls(cert, key, got):
        untrusted = HookClient(url, keep=1)
        with pytest.raises(ssl.SSLCertVerificationError):
            await untrusted.post(b"{}", {})
        assert got == [], "nothing sent to a receiver whose certificate is not trusted"

        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        trusted = HookClient(url, keep=1)
        assert await trusted.post(b'{"n": 1}', {"Content-Type": "application/json"}) == 204
        assert await trusted.post(b'{"n": 2}', {}) == 204
        trusted.close()
        assert got == [b'{"n": 1}', b'{"n": 2}']
