"""The wire protocol (SPEC §4): client frame validation and server frame encoding.

Server frames are built as dicts and encoded once with orjson; the same bytes are
then written to every socket that receives them. Frames that carry a per-user seq
are published *without* their leading ``{`` so that the Redis delivery script can
prepend ``{"seq":N,`` atomically (see common/transport/bus.py).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson

ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
MAX_USER_ID = 128
MAX_CLIENT_MSG_ID = 64
# `metadata` bounds (SPEC §3): the bytes default of FANOUT_MAX_METADATA, and a fixed
# nesting depth. orjson parses 1024 levels but encodes at most 255, and every envelope
# the metadata travels in adds levels; 16 leaves that far out of reach.
DEFAULT_MAX_METADATA = 4096
MAX_METADATA_DEPTH = 16


class ErrorCode(StrEnum):
    BAD_REQUEST = "BAD_REQUEST"
    UNKNOWN_TYPE = "UNKNOWN_TYPE"
    MSG_TOO_LARGE = "MSG_TOO_LARGE"
    RATE_LIMIT = "RATE_LIMIT"
    FORBIDDEN = "FORBIDDEN"
    NOT_FOUND = "NOT_FOUND"
    SESSION_CLOSED = "SESSION_CLOSED"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL_ERROR = "INTERNAL_ERROR"
    # An `auth` frame's token is invalid or expired; the connection's token stays.
    BAD_TOKEN = "BAD_TOKEN"


RETRYABLE = frozenset({ErrorCode.RATE_LIMIT, ErrorCode.UNAVAILABLE, ErrorCode.INTERNAL_ERROR})


class CloseCode:
    GOING_AWAY = 1001
    PROTOCOL = 1002
    POLICY = 1008
    TOO_BIG = 1009
    INTERNAL = 1011
    TRY_AGAIN = 1013


class ProtocolError(Exception):
    """A client frame that gets an `error` frame back; the connection stays open."""

    def __init__(self, code: ErrorCode, message: str, frame_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.frame_id = frame_id


@dataclass(frozen=True, slots=True)
class Chat:
    id: str
    session_id: str
    content: str
    metadata: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class Typing:
    session_id: str
    is_typing: bool


@dataclass(frozen=True, slots=True)
class Read:
    session_id: str
    message_id: int


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class Auth:
    """A fresh token for the connection (verified by the router, not here)."""

    token: str


ClientFrame = Chat | Typing | Read | Ping | Auth


def is_valid_device_id(value: str) -> bool:
    return bool(ID_PATTERN.match(value))


def canonical_session_id(value: str) -> str:
    """A session id as Postgres prints it (lower case): ids are hashed to partitions and
    used in keys, so one session must have one spelling."""
    return str(uuid.UUID(value))


def is_session_id(value: object) -> bool:
    if not isinstance(value, str) or len(value) != 36:
        return False
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


def parse_client_frame(
    data: str | bytes,
    default_session: str | None,
    max_content: int,
    *,
    max_metadata: int = DEFAULT_MAX_METADATA,
) -> ClientFrame:
    """Validate one client frame; raise ProtocolError with the SPEC's code on bad input."""
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "frame is not valid JSON") from None
    if not isinstance(raw, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "frame must be a JSON object")
    frame_id = raw.get("id") if isinstance(raw.get("id"), str) else None
    kind = raw.get("type")
    if not isinstance(kind, str):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "frame has no string 'type'", frame_id)
    if kind == "chat":
        return _chat(raw, default_session, max_content, max_metadata)
    if kind == "ping":
        return Ping()
    if kind == "typing":
        is_typing = raw.get("is_typing")
        if not isinstance(is_typing, bool):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "'is_typing' must be a boolean", frame_id)
        return Typing(_session(raw, default_session, frame_id), is_typing)
    if kind == "read":
        message_id = raw.get("message_id")
        if not isinstance(message_id, int) or isinstance(message_id, bool) or message_id < 1:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, "'message_id' must be a positive integer", frame_id
            )
        return Read(_session(raw, default_session, frame_id), message_id)
    if kind == "auth":
        token = raw.get("token")
        if not isinstance(token, str) or not token:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, "'token' must be a non-empty string", frame_id
            )
        return Auth(token)
    raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown frame type {kind[:32]!r}", frame_id)


def _session(raw: dict[str, Any], default_session: str | None, frame_id: str | None) -> str:
    session_id = raw.get("session_id", default_session)
    if session_id is None:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, "'session_id' is required (no default session)", frame_id
        )
    if not is_session_id(session_id):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'session_id' must be a UUID string", frame_id)
    assert isinstance(session_id, str)
    return canonical_session_id(session_id)


def _chat(
    raw: dict[str, Any], default_session: str | None, max_content: int, max_metadata: int
) -> Chat:
    frame_id = raw.get("id")
    if not isinstance(frame_id, str) or not 1 <= len(frame_id) <= MAX_CLIENT_MSG_ID:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, "'id' must be a string of 1 to 64 characters", None
        )
    session_id = _session(raw, default_session, frame_id)
    content = raw.get("content")
    if not isinstance(content, str):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'content' must be a string", frame_id)
    if len(content.encode()) > max_content:
        raise ProtocolError(
            ErrorCode.MSG_TOO_LARGE, f"'content' is over {max_content} bytes", frame_id
        )
    metadata = raw.get("metadata")
    if metadata is not None:
        try:
            metadata = check_metadata(metadata, max_metadata)
        except InvalidMetadata as exc:
            raise ProtocolError(ErrorCode.BAD_REQUEST, str(exc), frame_id) from None
    if has_nul(frame_id) or has_nul(content):
        # Postgres text cannot store U+0000: refused here, before the ack, not
        # dead-lettered by the worker after it.
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, "'id' and 'content' must not contain U+0000", frame_id
        )
    return Chat(frame_id, session_id, content, metadata)


class InvalidMetadata(ValueError):
    """`metadata` that must be refused at the edge; the message says why, for the client."""


def check_metadata(value: object, max_bytes: int) -> dict[str, Any]:
    """`value` if it is acceptable session or message metadata; InvalidMetadata otherwise.

    The one check for every way in (session create/PATCH, chat frames, HTTP messages):
    an object, nested at most MAX_METADATA_DEPTH levels, at most `max_bytes` encoded,
    without U+0000 (Postgres jsonb cannot hold it). Nothing that fails it is stored.
    """
    if not isinstance(value, dict):
        raise InvalidMetadata("'metadata' must be an object")
    if metadata_depth(value) > MAX_METADATA_DEPTH:
        raise InvalidMetadata(f"'metadata' is nested deeper than {MAX_METADATA_DEPTH} levels")
    if has_nul(value):
        raise InvalidMetadata("'metadata' must not contain U+0000")
    if len(orjson.dumps(value)) > max_bytes:
        raise InvalidMetadata(f"'metadata' is over {max_bytes} bytes encoded")
    return value


def metadata_depth(value: object) -> int:
    """Nesting depth of a JSON value: a scalar is 0, ``{}`` is 1, ``{"a": []}`` is 2."""
    # A stack, not recursion: a parsed frame can nest 1024 levels.
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth + 1)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def has_nul(value: object) -> bool:
    """Whether a JSON value holds U+0000 in any string (keys included)."""
    # A stack, not recursion: a 64 KiB frame can nest deeper than Python's limit.
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


# -- server frames ------------------------------------------------------------------------


def encode(frame: dict[str, Any]) -> bytes:
    """The one encoder of server frames."""
    return orjson.dumps(frame)


def error_frame(code: ErrorCode, message: str, frame_id: str | None = None) -> bytes:
    frame: dict[str, Any] = {
        "type": "error",
        "code": code.value,
        "message": message,
        "retry": code in RETRYABLE,
    }
    if frame_id is not None:
        frame["id"] = frame_id
    return encode(frame)


def seq_of(frame: bytes) -> int | None:
    """The seq of a logged frame, read from its fixed prefix ``{"seq":N,`` without parsing."""
    if not frame.startswith(b'{"seq":'):
        return None
    end = frame.index(b",", 7)
    return int(frame[7:end])


# Ephemeral frames meant for all devices but one carry this prefix on the bus:
# b"!" + device_id + b"\n" + frame. The node strips it before writing.
SKIP_MARK = b"!"


def skip_device(frame: bytes, device_id: str) -> bytes:
    return SKIP_MARK + device_id.encode() + b"\n" + frame


# Logged frames are published as b"@" + Redis TIME in microseconds + b"\n" + frame (the
# delivery script stamps them): the node's delivery latency runs from that moment.
STAMP_MARK = b"@"


def unstamp(data: bytes) -> tuple[float | None, bytes]:
    """(publish time in seconds since the epoch, or None if unstamped; the frame)."""
    if data[:1] != STAMP_MARK:
        return None, data
    stamp, _, frame = data[1:].partition(b"\n")
    return int(stamp) / 1_000_000, frame
