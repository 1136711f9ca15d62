"""Pure logic of the HTTP and data limits (issue 13): metadata, token lifetime, log lines,
configuration."""

from __future__ import annotations

import logging
import sys
import time
import uuid
from typing import Any

import jwt
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.crc import key_slot

from common.auth import AuthError, TokenVerifier
from common.config import ConfigError, Settings
from common.logs import JsonFormatter, TextFormatter, escape
from common.protocol import (
    MAX_METADATA_DEPTH,
    ErrorCode,
    InvalidMetadata,
    ProtocolError,
    check_metadata,
    metadata_depth,
    parse_client_frame,
)
from common.transport.keys import Keys, user_from_tag, user_tag

SECRET = "unit-test-secret-0123456789abcdef-0123"
SID = str(uuid.uuid4())


def nested(depth: int) -> dict[str, Any]:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"k": value}
    assert isinstance(value, dict)
    return value


def test_metadata_depth_counts_objects_and_lists() -> None:
    assert metadata_depth(1) == 0
    assert metadata_depth({}) == 1
    assert metadata_depth({"a": []}) == 2
    assert metadata_depth({"a": [1, {"b": [[]]}], "c": {}}) == 5
    assert metadata_depth(nested(1000)) == 1000  # no recursion limit


def test_check_metadata_bounds_depth_size_type_and_nul() -> None:
    assert check_metadata(nested(MAX_METADATA_DEPTH), 4096) == nested(MAX_METADATA_DEPTH)
    with pytest.raises(InvalidMetadata, match="deeper than 16"):
        check_metadata(nested(MAX_METADATA_DEPTH + 1), 4096)
    with pytest.raises(InvalidMetadata, match="deeper"):
        check_metadata({"l": [[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]}, 4096)
    exact = {"b": "x" * (100 - len(orjson.dumps({"b": ""})))}
    assert len(orjson.dumps(exact)) == 100
    assert check_metadata(exact, 100) == exact
    with pytest.raises(InvalidMetadata, match="over 99 bytes"):
        check_metadata(exact, 99)
    with pytest.raises(InvalidMetadata, match="object"):
        check_metadata([1], 100)
    with pytest.raises(InvalidMetadata, match="U\\+0000"):
        check_metadata({"k\x00": 1}, 100)


def test_chat_frames_refuse_bad_metadata_with_their_id() -> None:
    def chat(metadata: object) -> bytes:
        frame = {"type": "chat", "id": "c1", "session_id": SID, "content": "hi"}
        return orjson.dumps({**frame, "metadata": metadata})

    assert parse_client_frame(chat({"a": 1}), None, 100, max_metadata=50) is not None
    for bad in (nested(17), {"a": "y" * 60}, "text"):
        with pytest.raises(ProtocolError) as refused:
            parse_client_frame(chat(bad), None, 100, max_metadata=50)
        assert refused.value.code == ErrorCode.BAD_REQUEST
        assert refused.value.frame_id == "c1"
    # 1000 levels parse (orjson allows 1024) and are refused, not a crash later.
    deep = b'{"type":"chat","id":"c2","content":"x","metadata":' + b'{"a":' * 1000
    deep += b"1" + b"}" * 1001
    with pytest.raises(ProtocolError, match="deeper"):
        parse_client_frame(deep, SID, 100)


def _verifier(**overrides: Any) -> TokenVerifier:
    return TokenVerifier(Settings(jwt_secret=SECRET, **overrides))


def _token(**claims: Any) -> str:
    return jwt.encode({"sub": "ann", **claims}, SECRET, algorithm="HS256")


def test_jwt_max_ttl_counts_from_now_and_from_iat() -> None:
    now = int(time.time())
    limited = _verifier(jwt_max_ttl=600)
    assert limited.verify(_token(exp=now + 590)).user_id == "ann"
    assert limited.verify(_token(iat=now - 100, exp=now + 400)).user_id == "ann"
    with pytest.raises(AuthError, match="from now"):
        limited.verify(_token(exp=now + 700))
    with pytest.raises(AuthError, match="exp - iat"):
        limited.verify(_token(iat=now - 500, exp=now + 200))
    # Unset: any lifetime.
    assert _verifier().verify(_token(exp=now + 10**8)).user_id == "ann"


def test_a_sub_with_a_lone_surrogate_is_refused() -> None:
    with pytest.raises(AuthError, match="UTF-8"):
        _verifier().verify(_token(sub="x\udc80", exp=int(time.time()) + 60))
    assert _verifier().verify(_token(sub="zoë ☃", exp=int(time.time()) + 60)).user_id == "zoë ☃"


def _record(message: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("bad\n2026-01-01 00:00:00,000 INFO fanout.node: forged")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord("fanout.node", logging.INFO, __file__, 1, message, args, exc_info)


def test_text_logs_keep_a_client_string_on_one_line() -> None:
    forged = "eve\n2026-01-01 00:00:00,000 ERROR fanout.node: admin logged in\r\x1b[2J\u2028"
    line = TextFormatter().format(_record("frame from %s/%s failed", forged, "d1"))
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    assert "\u2028" not in line
    assert "eve\\n2026-01-01" in line and "\\x1b[2J" in line
    lines = TextFormatter().format(_record("boom %s", forged, exc=True)).split("\n")
    assert "\n" not in lines[0]
    assert all(line.startswith("    ") for line in lines[1:]), lines
    assert escape("plain ünïcode ☃") == "plain ünïcode ☃"
    assert escape("\udc80") == "\\udc80"


def test_json_logs_are_one_object_per_line() -> None:
    forged = 'eve"\n{"level": "ERROR"}\udc80'
    for exc in (False, True):
        line = JsonFormatter().format(_record("user %s connected", forged, exc=exc))
        assert "\n" not in line
        entry = orjson.loads(line)
        assert entry["level"] == "INFO" and entry["logger"] == "fanout.node"
        assert entry["message"].startswith('user eve"\n{"level": "ERROR"}')
        assert ("exc" in entry) is exc


def test_settings_of_the_data_limits() -> None:
    base = {"FANOUT_JWT_SECRET": SECRET}
    d = Settings.from_env(base)
    assert (d.max_metadata, d.http_head_timeout, d.http_body_timeout) == (4096, 10.0, 30.0)
    assert d.jwt_max_ttl is None and d.log_format == "text"
    s = Settings.from_env(
        {
            **base,
            "FANOUT_MAX_METADATA": "8192",
            "FANOUT_HTTP_HEAD_TIMEOUT": "2.5",
            "FANOUT_HTTP_BODY_TIMEOUT": "7",
            "FANOUT_PEER_RATE": "0.5",
            "FANOUT_PEER_BURST": "10",
            "FANOUT_JWT_MAX_TTL": "3600",
            "FANOUT_LOG_FORMAT": "json",
        }
    )
    assert (s.max_metadata, s.http_head_timeout, s.http_body_timeout) == (8192, 2.5, 7.0)
    assert (s.peer_rate, s.peer_burst, s.jwt_max_ttl, s.log_format) == (0.5, 10, 3600, "json")
    for name, bad in (
        ("FANOUT_LOG_FORMAT", "xml"),
        ("FANOUT_JWT_MAX_TTL", "soon"),
        ("FANOUT_JWT_MAX_TTL", "0"),
        ("FANOUT_MAX_METADATA", "-1"),
        ("FANOUT_HTTP_HEAD_TIMEOUT", "0"),
    ):
        with pytest.raises(ConfigError, match=name):
            Settings.from_env({**base, name: bad})


def _user_keys(keys: Keys, user: str) -> list[str]:
    return [
        keys.user_channel(user),
        keys.seq(user),
        keys.log(user),
        keys.delivered(user, "m1"),
        keys.devices(user),
        keys.device_conns(user),
    ]


@pytest.mark.parametrize("user", ["}eve", "{x}", "a}b{c", "}", "%7D", "50%", "{}", "plain"])
def test_a_users_keys_share_one_slot_whatever_braces_the_id_holds(user: str) -> None:
    keys = Keys("ns:")
    names = _user_keys(keys, user)
    # The tag is the whole encoded id: one slot, and a different one from another user's.
    assert {key_slot(k.encode()) for k in names} == {key_slot(user_tag(user).encode())}
    assert "{" not in user_tag(user) and "}" not in user_tag(user)
    assert keys.user_from_channel(keys.user_channel(user).encode()) == user


@given(st.text(min_size=1, max_size=128))
def test_user_tags_round_trip(user: str) -> None:
    assert user_from_tag(user_tag(user)) == user
    assert "{" not in user_tag(user) and "}" not in user_tag(user)
