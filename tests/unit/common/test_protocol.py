"""Client frame validation and server frame encoding (pure logic)."""

from __future__ import annotations

import uuid

import orjson
import pytest

from common.protocol import (
    Auth,
    Chat,
    ErrorCode,
    Ping,
    ProtocolError,
    Read,
    Typing,
    error_frame,
    parse_client_frame,
    seq_of,
    skip_device,
)
from common.transport.keys import Keys, partition_of

SID = str(uuid.uuid4())


def parse(frame: object, default: str | None = None, max_content: int = 100) -> object:
    return parse_client_frame(orjson.dumps(frame), default, max_content)


def test_valid_frames() -> None:
    assert parse({"type": "ping"}) == Ping()
    assert parse({"type": "chat", "id": "a", "session_id": SID, "content": "hi"}) == Chat(
        "a", SID, "hi", None
    )
    assert parse(
        {"type": "chat", "id": "a", "content": "hi", "metadata": {"k": 1}}, default=SID
    ) == Chat("a", SID, "hi", {"k": 1})
    assert parse({"type": "typing", "is_typing": True}, default=SID) == Typing(SID, True)
    assert parse({"type": "read", "session_id": SID, "message_id": 3}) == Read(SID, 3)
    assert parse({"type": "auth", "token": "t.o.k"}) == Auth("t.o.k")


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ({"type": "chat", "id": "a", "content": "hi"}, ErrorCode.BAD_REQUEST),  # no session
        ({"type": "chat", "id": "", "session_id": SID, "content": "hi"}, ErrorCode.BAD_REQUEST),
        (
            {"type": "chat", "id": "a" * 65, "session_id": SID, "content": "hi"},
            ErrorCode.BAD_REQUEST,
        ),
        ({"type": "chat", "id": "a", "session_id": SID, "content": None}, ErrorCode.BAD_REQUEST),
        (
            {"type": "chat", "id": "a", "session_id": SID, "content": "x" * 101},
            ErrorCode.MSG_TOO_LARGE,
        ),
        (
            {"type": "chat", "id": "a", "session_id": SID, "content": "x", "metadata": []},
            ErrorCode.BAD_REQUEST,
        ),
        ({"type": "read", "session_id": SID, "message_id": True}, ErrorCode.BAD_REQUEST),
        # U+0000 cannot be stored by Postgres: refused before the ack, wherever it hides.
        (
            {"type": "chat", "id": "a", "session_id": SID, "content": "a\x00b"},
            ErrorCode.BAD_REQUEST,
        ),
        ({"type": "chat", "id": "a\x00", "session_id": SID, "content": "x"}, ErrorCode.BAD_REQUEST),
        (
            {
                "type": "chat",
                "id": "a",
                "session_id": SID,
                "content": "x",
                "metadata": {"deep": [{"k\x00": 1}]},
            },
            ErrorCode.BAD_REQUEST,
        ),
        ({"type": 5}, ErrorCode.BAD_REQUEST),
        ({"type": "auth"}, ErrorCode.BAD_REQUEST),
        ({"type": "auth", "token": ""}, ErrorCode.BAD_REQUEST),
        ({"type": "auth", "token": 5}, ErrorCode.BAD_REQUEST),
        ({"type": "shout"}, ErrorCode.UNKNOWN_TYPE),
    ],
)
def test_invalid_frames(frame: dict, code: ErrorCode) -> None:  # type: ignore[type-arg]
    with pytest.raises(ProtocolError) as caught:
        parse(frame)
    assert caught.value.code is code


def test_session_ids_are_canonical_whatever_the_case() -> None:
    # One session, one spelling: its id picks the partition and names its keys.
    upper = parse({"type": "chat", "id": "a", "session_id": SID.upper(), "content": "x"})
    assert upper == Chat("a", SID, "x", None)
    assert parse({"type": "typing", "is_typing": True}, default=SID.upper()) == Typing(SID, True)


def test_deeply_nested_metadata_is_checked_without_recursion() -> None:
    # orjson parses nesting deeper than Python's recursion limit; the checks cope, and
    # refuse it (SPEC §3: depth at most 16) instead of failing later.
    depth = 1000
    data = b'{"type":"chat","id":"a","session_id":"%s","content":"x","metadata":{"d":%s"clean"%s}}'
    with pytest.raises(ProtocolError) as refused:
        parse_client_frame(data % (SID.encode(), b"[" * depth, b"]" * depth), None, 100)
    assert refused.value.code == ErrorCode.BAD_REQUEST and refused.value.frame_id == "a"


def test_content_limit_counts_bytes_not_characters() -> None:
    with pytest.raises(ProtocolError):
        parse({"type": "chat", "id": "a", "session_id": SID, "content": "é" * 51})


def test_error_frame_shape() -> None:
    frame = orjson.loads(error_frame(ErrorCode.RATE_LIMIT, "slow down", "m1"))
    assert frame == {
        "type": "error",
        "code": "RATE_LIMIT",
        "message": "slow down",
        "retry": True,
        "id": "m1",
    }
    assert orjson.loads(error_frame(ErrorCode.FORBIDDEN, "no"))["retry"] is False


def test_seq_prefix_and_skip_marker() -> None:
    assert seq_of(b'{"seq":42,"type":"message"}') == 42
    assert seq_of(b'{"type":"typing"}') is None
    assert skip_device(b"{}", "d1") == b"!d1\n{}"


def test_keys_share_the_user_hash_tag() -> None:
    keys = Keys("ns:")
    user = "alice"
    tagged = [keys.user_channel(user), keys.seq(user), keys.log(user), keys.delivered(user, "m1")]
    assert all("{alice}" in k for k in tagged)
    assert keys.user_from_channel(keys.user_channel(user).encode()) == user
    assert keys.user_from_channel(keys.user_channel("we{ird}").encode()) == "we{ird}"


def test_partition_is_stable_and_in_range() -> None:
    assert partition_of(SID, 16) == partition_of(SID, 16)
    assert all(0 <= partition_of(str(uuid.uuid4()), 7) < 7 for _ in range(100))
