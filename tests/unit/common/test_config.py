"""Configuration: defaults, validation, and one clear line on a bad value."""

from __future__ import annotations

import subprocess
import sys

import pytest

from common.config import ConfigError, Settings
from common.transport.keys import Keys

GOOD_SECRET = "s" * 32


def test_defaults_match_the_spec() -> None:
    s = Settings.from_env({})
    assert (s.redis_url, s.database_url) == (
        "redis://127.0.0.1:6379/0",
        "postgresql://127.0.0.1:5432/fanout",
    )
    assert (s.partitions, s.heartbeat, s.max_frame, s.max_content) == (16, 30, 65536, 16384)
    assert (s.rate, s.rate_burst, s.max_devices, s.send_queue_bytes) == (20, 40, 5, 1048576)
    assert (s.user_log_maxlen, s.user_log_ttl, s.lease_ttl, s.claim_idle) == (1000, 86400, 10, 15)
    assert (s.max_attempts, s.session_ttl, s.drain_timeout) == (5, 86400, 20)
    assert s.subscription_mode == "user" and s.allowed_origins is None


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("FANOUT_RATE", "fast", "FANOUT_RATE must be a number"),
        ("FANOUT_PARTITIONS", "0", "FANOUT_PARTITIONS must be between"),
        ("FANOUT_PARTITIONS", "1.5", "whole number"),
        ("FANOUT_SUBSCRIPTION_MODE", "broadcast", "FANOUT_SUBSCRIPTION_MODE must be one of"),
        ("FANOUT_REDIS_URL", "http://x", "FANOUT_REDIS_URL must be"),
        ("FANOUT_DATABASE_URL", "mysql://x", "FANOUT_DATABASE_URL must be"),
        ("FANOUT_REDIS_CLUSTER", "maybe", "must be 0 or 1"),
        ("FANOUT_JWT_SECRET", "short", "at least 32 bytes"),
        ("FANOUT_NAMESPACE", "a{b}", "FANOUT_NAMESPACE"),
        ("FANOUT_ECHO_DELAY", "-1", "FANOUT_ECHO_DELAY must be between"),
    ],
)
def test_bad_values_name_the_variable(name: str, value: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        Settings.from_env({name: value})


def test_origins_are_a_list() -> None:
    s = Settings.from_env({"FANOUT_ALLOWED_ORIGINS": "https://a.example/, https://b.example"})
    assert s.allowed_origins == ("https://a.example", "https://b.example")


def test_node_requires_a_key() -> None:
    with pytest.raises(ConfigError, match="required"):
        Settings.from_env({}).require_jwt()
    Settings.from_env({"FANOUT_JWT_SECRET": GOOD_SECRET}).require_jwt()


@pytest.mark.parametrize("command", ["node", "worker"])
def test_processes_exit_with_one_line_on_a_bad_value(command: str) -> None:
    env = {"FANOUT_JWT_SECRET": GOOD_SECRET, "FANOUT_HEARTBEAT": "soon", "PATH": "/usr/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "common.cli", command],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "fanout: configuration error: FANOUT_HEARTBEAT must be a number, got 'soon'"
    ]


def test_node_without_a_key_exits_with_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "common.cli", "node"],
        env={"PATH": "/usr/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "FANOUT_JWT_SECRET or FANOUT_JWT_PUBLIC_KEY is required" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("raw", "prefix"), [("eco", "eco:"), ("eco:", "eco:"), ("", "")])
def test_namespace_is_separated_from_the_key(raw: str, prefix: str) -> None:
    keys = Keys(Settings.from_env({"FANOUT_NAMESPACE": raw}).namespace)
    assert keys.partition_stream(0) == f"{prefix}channel:conv:p0"
