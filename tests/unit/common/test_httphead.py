"""common/httphead.py: the response head both of fanout's HTTP-speaking clients read."""

from __future__ import annotations

import pytest

from common.httphead import parse_response_head


def test_status_reason_and_headers() -> None:
    head = parse_response_head(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nX-Two:  a: b \r\n\r\n"
    )
    assert (head.version, head.status, head.reason) == ("HTTP/1.1", 101, "Switching Protocols")
    assert head.headers == {"upgrade": "websocket", "x-two": "a: b"}
    assert parse_response_head(b"HTTP/1.0 204").reason == ""


@pytest.mark.parametrize(
    "line", [b"SSH-2.0-OpenSSH_9.2", b"HTTP/1.1 OK", b"HTTP/2 200 OK", b"HTTP/1.1 2000 x", b""]
)
def test_anything_else_is_refused(line: bytes) -> None:
    with pytest.raises(ValueError, match="not an HTTP response"):
        parse_response_head(line + b"\r\n\r\n")
