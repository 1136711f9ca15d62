"""An HTTP/1.x response head as fanout's own clients read it: the WebSocket client's
handshake (common/client/websocket.py) and the webhook dispatcher's answers
(worker/webhooks/http.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """The status line's parts and the headers (names lower-cased, values stripped)."""

    version: str
    status: int
    reason: str
    headers: dict[str, str]


def parse_response_head(head: bytes) -> ResponseHead:
    """The status line and headers up to the blank line; ValueError if it is not HTTP/1.x."""
    status_line, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    version, _, rest = status_line.partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise ValueError(f"not an HTTP response: {status_line[:80]!r}")
    headers: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return ResponseHead(version, int(code), reason, headers)
