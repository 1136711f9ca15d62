"""PRIVATE API of redis-py: what the lean connection (connection.py) borrows from it.

Depends on redis==8.1.0 (pinned in pyproject.toml) beyond its documented API; an
upgrade reviews this file and runs tests/transport/test_redis_private.py, which checks the
behaviour relied on against a real Redis. What it relies on:

- `redis._parsers.base.BaseParser.parse_error(text)` turns the text of a Redis error
  reply (hiredis hands it over as a `ReplyError`) into the exception redis-py itself
  raises for it: `NOSCRIPT` a `NoScriptError` (the bus reloads its script on that
  class), `WRONGTYPE`/`ERR` a `ResponseError`, `READONLY` a `ReadOnlyError`, and so on,
  the message without its code.
- `redis.connection.parse_url(url)` (undocumented) reads a redis://, rediss:// or
  unix:// URL into connection keywords: host, port, path, db, username, password, and
  `connection_class` (`SSLConnection` for rediss://).

Why at all: redis-py spends more client CPU per command than the lean connection
(README "Benchmarks": client CPU per Redis command), and both must raise the same
errors so callers cannot tell which one sent a command.
"""

from __future__ import annotations

from typing import Any

from redis._parsers.base import BaseParser
from redis.connection import SSLConnection, parse_url


def error_from_reply(text: str) -> Exception:
    """The exception redis-py raises for this error reply (its text, code first)."""
    error: Exception = BaseParser.parse_error(text)  # type: ignore[no-untyped-call]
    return error


def url_settings(url: str) -> dict[str, Any]:
    """Where and how a redis://, rediss:// or unix:// URL connects (tls: rediss://)."""
    params: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
    return {
        "host": params.get("host", "127.0.0.1"),
        "port": params.get("port", 6379),
        "path": params.get("path"),
        "tls": params.get("connection_class") is SSLConnection,
        "db": params.get("db", 0),
        "username": params.get("username"),
        "password": params.get("password"),
    }
