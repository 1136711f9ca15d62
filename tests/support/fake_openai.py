"""A small OpenAI-compatible chat-completions server for tests, on loopback.

It speaks the streaming format (server-sent events: `data: {chat.completion.chunk}`
lines, then `data: [DONE]`) and answers "<prefix><last message>", `words_per_chunk`
words per chunk ("Echo: ", one; scripts/bench_assistant.py makes it answer as the
built-in echo does).
Tests steer it:
- `fail_with = 500`: every request gets that HTTP status;
- a last message starting with "stall": one chunk ("Thinking"), then nothing until
  `release` is set (then the rest); `stalled` counts the requests that got there;
- a last message starting with "garbage": a chunk that is not JSON.
Every request is kept in `requests` (headers and JSON body).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import orjson
from aiohttp import web


@dataclass(frozen=True, slots=True)
class Seen:
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass(slots=True)
class FakeOpenAI:
    prefix: str = "Echo: "
    words_per_chunk: int = 1
    port: int = 0
    fail_with: int | None = None
    requests: list[Seen] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    stalled: int = 0
    peers: set[object] = field(default_factory=set)  # client (host, port)s: new connections
    url: str = ""
    _runner: web.AppRunner | None = None

    async def __aenter__(self) -> FakeOpenAI:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._completions)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/v1"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    def bodies(self) -> list[dict[str, Any]]:
        return [seen.body for seen in self.requests]

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if request.transport is not None:
            self.peers.add(request.transport.get_extra_info("peername"))
        self.requests.append(Seen(dict(request.headers), body))
        if self.fail_with is not None:
            return web.json_response({"error": {"message": "boom"}}, status=self.fail_with)
        last: str = body["messages"][-1]["content"]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if last.startswith("garbage"):
            await resp.write(b"data: {not json\n\n")
            return resp
        if last.startswith("stall"):
            await _send(resp, body, "Thinking")
            self.stalled += 1
            await self.release.wait()
        words = f"{self.prefix}{last}".split(" ")
        for start in range(0, len(words), self.words_per_chunk):
            text = " ".join(words[start : start + self.words_per_chunk])
            await _send(resp, body, text if start == 0 else " " + text)
        await resp.write(_event(body, {}, finish="stop"))
        await resp.write(b"data: [DONE]\n\n")
        return resp


async def _send(resp: web.StreamResponse, body: dict[str, Any], text: str) -> None:
    await resp.write(_event(body, {"content": text}))


def _event(body: dict[str, Any], delta: dict[str, str], finish: str | None = None) -> bytes:
    chunk = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "model": body.get("model"),
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\n"
