"""Exceptions that mean "a backing service is down": retry later, never a bad request."""

from __future__ import annotations

import asyncpg
import redis.exceptions

SERVICE_DOWN: tuple[type[Exception], ...] = (
    OSError,
    TimeoutError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.BusyLoadingError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
)


class StartError(RuntimeError):
    """A process cannot start (a service down, a port in use); the message is one line."""
