"""Replies from any OpenAI-compatible chat-completions endpoint, streamed (SPEC §10).

One POST per reply to `{FANOUT_ASSISTANT_URL}/chat/completions` with `stream: true`;
the answer is server-sent events, one `data: {json}` line per chunk, ending with
`data: [DONE]`. The context is the system prompt, then the session's last messages
up to the one being answered (common/store/replies.py), oldest first.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson

from common.store.postgres import MessageRecord, SessionRecord
from common.store.replies import Turn
from worker.assistant.base import GeneratorError

# Loads the context: (session id, below this message id, how many) -> turns, oldest first.
History = Callable[[str, int, int], Awaitable[list[Turn]]]

_DONE = b"[DONE]"
# Seconds to wait for the end of the body after [DONE].
LINGER = 0.1


class OpenAIAssistant:
    """Streams a reply from an OpenAI-compatible server over one shared HTTP client."""

    def __init__(
        self,
        http: aiohttp.ClientSession,
        history: History,
        *,
        base_url: str,
        model: str,
        api_key: str | None = None,
        system_prompt: str | None = None,
        history_size: int = 20,
        timeout: float = 30.0,
    ) -> None:
        self._http = http
        self._history = history
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._model = model
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._system = system_prompt
        self._earlier = history_size
        # Read timeout: seconds without a byte from the server (a stalled stream).
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)

    async def reply(self, session: SessionRecord, message: MessageRecord) -> AsyncIterator[str]:
        turns = [Turn("user", message.content)]  # the message answered is in hand
        if self._earlier:
            turns = await self._history(session.id, message.id, self._earlier) + turns
        body = {"model": self._model, "stream": True, "messages": self._messages(turns)}
        headers = self._request_headers()
        async with self._http.post(
            self._url, data=orjson.dumps(body), headers=headers, timeout=self._timeout
        ) as resp:
            if resp.status >= 400:
                text = (await resp.text(errors="replace"))[:200]
                raise GeneratorError(f"HTTP {resp.status} from {self._url}: {text}")
            finished = False
            # Lines are split here from whatever each read brings (usually a whole event
            # or more): a readline per line cost more CPU than the rest of the parsing.
            pending = b""
            while True:
                block = await resp.content.readany()  # b"" at the end of the body
                lines = (pending + block).split(b"\n")
                pending = lines.pop() if block else b""  # at the end: a last line as is
                for line in lines:
                    data = _sse_data(line)
                    if data is None:
                        continue
                    if data == _DONE:
                        if not resp.content.at_eof():
                            await _read_to_end(resp)
                        return
                    text, finished = _chunk(data)
                    if text:
                        yield text
                if not block:
                    break
            if not finished:
                raise GeneratorError("the stream ended without [DONE] or a finish_reason")

    def _messages(self, turns: list[Turn]) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self._system}] if self._system else []
        return system + [{"role": t.role, "content": t.content} for t in turns]

    def _request_headers(self) -> dict[str, str]:
        return {**self._headers, "Content-Type": "application/json", "Accept": "text/event-stream"}


async def _read_to_end(resp: aiohttp.ClientResponse) -> None:
    """Read what follows [DONE] (the end of the chunked body): a response read to its end
    hands its connection back to the pool, one left unread closes it. Bounded, so a
    server that keeps the stream open after [DONE] costs LINGER s, not a stalled reply."""
    with contextlib.suppress(TimeoutError, aiohttp.ClientError):
        async with asyncio.timeout(LINGER):
            while await resp.content.readany():
                pass


def _sse_data(line: bytes) -> bytes | None:
    """The payload of a `data:` line; None for blank lines, comments and other fields."""
    line = line.rstrip(b"\r\n")
    if not line.startswith(b"data:"):
        return None
    return line[5:].strip()


def _chunk(data: bytes) -> tuple[str, bool]:
    """(text, finished) of one streamed chat.completion.chunk."""
    try:
        event: Any = orjson.loads(data)
        choice = event["choices"][0] if event.get("choices") else {}
        delta = choice.get("delta") or {}
        text = delta.get("content") or ""
        finished = choice.get("finish_reason") is not None
    except (orjson.JSONDecodeError, AttributeError, TypeError, KeyError, IndexError) as exc:
        raise GeneratorError(f"malformed stream chunk {data[:120]!r}") from exc
    if not isinstance(text, str):
        raise GeneratorError(f"malformed stream chunk {data[:120]!r}")
    if event.get("error"):
        raise GeneratorError(f"the server reported an error: {str(event['error'])[:200]}")
    return text, finished
