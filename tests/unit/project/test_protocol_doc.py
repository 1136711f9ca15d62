"""docs/protocol.md against the code: every error code, close code, client frame type and
default limit it states is the one the node uses, so the reference cannot drift."""

from __future__ import annotations

import re
from pathlib import Path

from common.config import Settings
from common.protocol import CloseCode, ErrorCode, ProtocolError, parse_client_frame
from node.app import WEBSOCKET

DOC = (Path(__file__).resolve().parents[3] / "docs" / "protocol.md").read_text()


def section(title: str) -> str:
    """The text of one `## title` section."""
    start = DOC.index(f"## {title}\n")
    end = DOC.find("\n## ", start + 1)
    return DOC[start : end if end >= 0 else None]


def first_column(text: str) -> set[str]:
    """The first cell of each table row (without backticks), headers and rules left out."""
    cells = re.findall(r"^\| ([^|]+?) \|", text, re.MULTILINE)
    return {c.strip("`") for c in cells if not set(c) <= {"-"}} - {
        "code",
        "type",
        "status",
    }


def test_every_error_code_is_documented_and_none_other() -> None:
    assert first_column(section("Errors")) == {code.value for code in ErrorCode}


def test_every_close_code_the_node_sends_is_documented() -> None:
    sent = {v for k, v in vars(CloseCode).items() if k.isupper() and isinstance(v, int)}
    documented = {int(code) for code in first_column(section("Close codes"))}
    assert sent <= documented
    assert documented - sent == {1007}  # invalid UTF-8: aiohttp's reader reports it


def test_the_documented_client_frames_are_the_ones_the_node_parses() -> None:
    documented = first_column(section("Frames from the client"))
    assert documented == {"chat", "typing", "read", "ping", "auth"}
    for kind in documented:
        assert _refusal(f'{{"type": "{kind}"}}') != ErrorCode.UNKNOWN_TYPE, kind
    assert _refusal('{"type": "nope"}') == ErrorCode.UNKNOWN_TYPE


def _refusal(frame: str) -> ErrorCode | None:
    """The error code the parser refuses a frame with (None: accepted)."""
    try:
        parse_client_frame(frame, None, 100)
    except ProtocolError as exc:
        return exc.code
    return None


def test_the_limits_stated_are_the_defaults() -> None:
    d = Settings()
    stated = [
        f"`content` is at most {d.max_content:,} bytes",
        f"at most\n{d.max_metadata:,} bytes encoded",
        f"A whole frame is at most {d.max_frame:,} bytes",
        f"over the rate ({d.rate:g} frames/s, bursts of {d.rate_burst})",
        f"(default {d.max_devices})",
        f"passed {d.send_queue_bytes // 1_048_576} MiB",
    ]
    for text in stated:
        assert text in DOC, text


def test_the_upgrade_refusals_are_the_ones_the_openapi_document_lists() -> None:
    [websocket] = WEBSOCKET
    documented = {int(status) for status in first_column(section("Connecting"))}
    assert documented == set(websocket.refusals())
