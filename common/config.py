"""Settings: one frozen dataclass built from the environment and validated at start."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is missing or malformed; the message is one line for the user."""


def _default_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Every knob of a node or worker (SPEC §3)."""

    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_cluster: bool = False
    database_url: str = "postgresql://127.0.0.1:5432/fanout"
    jwt_secret: str | None = None
    jwt_public_key: str | None = None
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    allowed_origins: tuple[str, ...] | None = None
    node_id: str = ""
    subscription_mode: str = "user"
    partitions: int = 16
    heartbeat: float = 30.0
    max_frame: int = 65536
    max_content: int = 16384
    rate: float = 20.0
    rate_burst: int = 40
    max_devices: int = 5
    send_queue_bytes: int = 1_048_576
    user_log_maxlen: int = 1000
    user_log_ttl: int = 86400
    lease_ttl: float = 10.0
    claim_idle: float = 15.0
    max_attempts: int = 5
    stats_interval: float = 1.0
    sweep_interval: float = 5.0
    session_ttl: int = 86400
    drain_timeout: float = 20.0
    # Not in SPEC §3: a prefix for every Redis key and channel, so that several
    # deployments (or test runs) can share one Redis. Empty by default.
    namespace: str = ""
    worker_port: int | None = None
    worker_concurrency: int = 256
    db_pool_size: int = 10
    # -- reply generators (SPEC §10; worker/assistant/) ---------------------------------
    # `echo`, `openai` or `module:callable`; the openai_* knobs apply to `openai` only.
    assistant: str = "echo"
    assistant_url: str | None = None
    assistant_model: str | None = None
    assistant_api_key: str | None = None
    assistant_system_prompt: str | None = None
    assistant_history: int = 20
    assistant_timeout: float = 30.0
    assistant_concurrency: int = 32
    # Not in SPEC §10: how often a failed reply is tried again, and the first back-off.
    assistant_retries: int = 3
    assistant_retry_delay: float = 0.5
    # -- abuse limits: HTTP and data (SPEC §3, §4, §6; README "Limits") ------------------
    max_metadata: int = 4096
    http_head_timeout: float = 10.0
    http_body_timeout: float = 30.0
    peer_rate: float = 1.0
    peer_burst: int = 30
    jwt_max_ttl: int | None = None
    log_format: str = "text"
    # -- integrations: participants, HTTP messages, webhooks (SPEC §6, §10) -------------
    # Participants of one session, the owner included; an add past it is a 409.
    max_participants: int = 100
    # Webhooks are on when a URL is set (on nodes and workers alike: both write the
    # outbox, common/store/outbox.py); the secret signs every delivery.
    webhook_url: str | None = None
    webhook_secret: str | None = None
    webhook_max_age: float = 86400.0
    # Not in SPEC §10: per-attempt timeout, deliveries in flight, the back-off's first
    # and longest wait, and how often the outbox is polled.
    webhook_timeout: float = 10.0
    webhook_concurrency: int = 16
    webhook_retry_base: float = 1.0
    webhook_retry_cap: float = 300.0
    webhook_poll: float = 0.2
    # -- browser client and demo (issue 15; node/static/client, worker/assistant/echo.py) --
    # Seconds between the echo assistant's chunks: 0 answers at once (tests); the demo
    # sets it so that a streamed reply can be watched arriving.
    echo_delay: float = 0.0
    # -- start-up and local use (SPEC §3) --
    # FANOUT_REUSE_PORT=1: several node processes may share one port (SO_REUSEPORT).
    reuse_port: bool = False
    # FANOUT_CLI: how the user runs this command (scripts/dev sets it), so that the
    # commands `fanout up` prints work as printed.
    cli_name: str = "fanout"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read FANOUT_* variables; raise ConfigError naming the first bad one."""
        e = os.environ if env is None else env
        r = _Reader(e)
        d = cls()
        settings = cls(
            redis_url=r.url("FANOUT_REDIS_URL", d.redis_url, ("redis", "rediss", "unix")),
            redis_cluster=r.flag("FANOUT_REDIS_CLUSTER", default=False),
            database_url=r.url("FANOUT_DATABASE_URL", d.database_url, ("postgresql", "postgres")),
            jwt_secret=r.optional("FANOUT_JWT_SECRET"),
            jwt_public_key=r.optional("FANOUT_JWT_PUBLIC_KEY"),
            jwt_audience=r.optional("FANOUT_JWT_AUDIENCE"),
            jwt_issuer=r.optional("FANOUT_JWT_ISSUER"),
            allowed_origins=r.csv("FANOUT_ALLOWED_ORIGINS"),
            node_id=r.optional("FANOUT_NODE_ID") or _default_node_id(),
            subscription_mode=r.choice("FANOUT_SUBSCRIPTION_MODE", "user", ("user", "pattern")),
            partitions=r.number("FANOUT_PARTITIONS", d.partitions, int, low=1, high=1024),
            heartbeat=r.number("FANOUT_HEARTBEAT", d.heartbeat, float, low=0.05),
            max_frame=r.number("FANOUT_MAX_FRAME", d.max_frame, int, low=256),
            max_content=r.number("FANOUT_MAX_CONTENT", d.max_content, int, low=1),
            rate=r.number("FANOUT_RATE", d.rate, float, low=0.1),
            rate_burst=r.number("FANOUT_RATE_BURST", d.rate_burst, int, low=1),
            max_devices=r.number("FANOUT_MAX_DEVICES", d.max_devices, int, low=1),
            send_queue_bytes=r.number("FANOUT_SEND_QUEUE_BYTES", d.send_queue_bytes, int, low=1024),
            user_log_maxlen=r.number("FANOUT_USER_LOG_MAXLEN", d.user_log_maxlen, int, low=1),
            user_log_ttl=r.number("FANOUT_USER_LOG_TTL", d.user_log_ttl, int, low=1),
            lease_ttl=r.number("FANOUT_LEASE_TTL", d.lease_ttl, float, low=0.5),
            claim_idle=r.number("FANOUT_CLAIM_IDLE", d.claim_idle, float, low=0.1),
            max_attempts=r.number("FANOUT_MAX_ATTEMPTS", d.max_attempts, int, low=1),
            stats_interval=r.number("FANOUT_STATS_INTERVAL", d.stats_interval, float, low=0.05),
            sweep_interval=r.number("FANOUT_SWEEP_INTERVAL", d.sweep_interval, float, low=0.05),
            session_ttl=r.number("FANOUT_SESSION_TTL", d.session_ttl, int, low=1),
            drain_timeout=r.number("FANOUT_DRAIN_TIMEOUT", d.drain_timeout, float, low=0),
            namespace=r.namespace("FANOUT_NAMESPACE"),
            worker_port=r.port("FANOUT_WORKER_PORT"),
            db_pool_size=r.number("FANOUT_DB_POOL_SIZE", d.db_pool_size, int, low=1, high=1000),
            worker_concurrency=r.number(
                "FANOUT_WORKER_CONCURRENCY", d.worker_concurrency, int, low=1, high=10_000
            ),
            # -- reply generators --
            assistant=r.generator("FANOUT_ASSISTANT", d.assistant),
            assistant_url=r.optional_url("FANOUT_ASSISTANT_URL", ("http", "https")),
            assistant_model=r.optional("FANOUT_ASSISTANT_MODEL"),
            assistant_api_key=r.optional("FANOUT_ASSISTANT_API_KEY"),
            assistant_system_prompt=r.optional("FANOUT_ASSISTANT_SYSTEM_PROMPT"),
            assistant_history=r.number(
                "FANOUT_ASSISTANT_HISTORY", d.assistant_history, int, low=0, high=1000
            ),
            assistant_timeout=r.number(
                "FANOUT_ASSISTANT_TIMEOUT", d.assistant_timeout, float, low=0.01
            ),
            assistant_concurrency=r.number(
                "FANOUT_ASSISTANT_CONCURRENCY", d.assistant_concurrency, int, low=1, high=10_000
            ),
            assistant_retries=r.number(
                "FANOUT_ASSISTANT_RETRIES", d.assistant_retries, int, low=0, high=100
            ),
            assistant_retry_delay=r.number(
                "FANOUT_ASSISTANT_RETRY_DELAY", d.assistant_retry_delay, float, low=0.0
            ),
            # -- abuse limits: HTTP and data --
            max_metadata=r.number("FANOUT_MAX_METADATA", d.max_metadata, int, low=2),
            http_head_timeout=r.number(
                "FANOUT_HTTP_HEAD_TIMEOUT", d.http_head_timeout, float, low=0.1
            ),
            http_body_timeout=r.number(
                "FANOUT_HTTP_BODY_TIMEOUT", d.http_body_timeout, float, low=0.1
            ),
            peer_rate=r.number("FANOUT_PEER_RATE", d.peer_rate, float, low=0.001),
            peer_burst=r.number("FANOUT_PEER_BURST", d.peer_burst, int, low=1),
            jwt_max_ttl=r.optional_number("FANOUT_JWT_MAX_TTL", int, low=1),
            log_format=r.choice("FANOUT_LOG_FORMAT", d.log_format, ("text", "json")),
            # -- integrations --
            max_participants=r.number(
                "FANOUT_MAX_PARTICIPANTS", d.max_participants, int, low=1, high=10_000
            ),
            webhook_url=r.optional_url("FANOUT_WEBHOOK_URL", ("http", "https")),
            webhook_secret=r.optional("FANOUT_WEBHOOK_SECRET"),
            webhook_max_age=r.number("FANOUT_WEBHOOK_MAX_AGE", d.webhook_max_age, float, low=0.1),
            webhook_timeout=r.number("FANOUT_WEBHOOK_TIMEOUT", d.webhook_timeout, float, low=0.05),
            webhook_concurrency=r.number(
                "FANOUT_WEBHOOK_CONCURRENCY", d.webhook_concurrency, int, low=1, high=1000
            ),
            webhook_retry_base=r.number(
                "FANOUT_WEBHOOK_RETRY_BASE", d.webhook_retry_base, float, low=0.01
            ),
            webhook_retry_cap=r.number(
                "FANOUT_WEBHOOK_RETRY_CAP", d.webhook_retry_cap, float, low=0.01
            ),
            webhook_poll=r.number("FANOUT_WEBHOOK_POLL", d.webhook_poll, float, low=0.01),
            echo_delay=r.number("FANOUT_ECHO_DELAY", d.echo_delay, float, low=0, high=10),
            reuse_port=r.flag("FANOUT_REUSE_PORT", default=False),
            cli_name=r.optional("FANOUT_CLI") or d.cli_name,
        )
        _check_webhooks(settings)
        if settings.assistant == "openai" and not (
            settings.assistant_url and settings.assistant_model
        ):
            raise ConfigError(
                "FANOUT_ASSISTANT=openai needs FANOUT_ASSISTANT_URL and FANOUT_ASSISTANT_MODEL"
            )
        if settings.jwt_secret and settings.jwt_public_key:
            raise ConfigError("set FANOUT_JWT_SECRET or FANOUT_JWT_PUBLIC_KEY, not both")
        if settings.redis_cluster and settings.subscription_mode == "pattern":
            raise ConfigError(
                "FANOUT_SUBSCRIPTION_MODE=pattern is not available with FANOUT_REDIS_CLUSTER=1"
                " (sharded pub/sub has no patterns)"
            )
        if settings.jwt_secret is not None and len(settings.jwt_secret.encode()) < 32:
            raise ConfigError("FANOUT_JWT_SECRET must be at least 32 bytes (HS256, RFC 7518)")
        return replace(settings, **overrides) if overrides else settings

    def require_jwt(self) -> None:
        """Nodes verify tokens: one of the two key settings must be present."""
        if not (self.jwt_secret or self.jwt_public_key):
            raise ConfigError("FANOUT_JWT_SECRET or FANOUT_JWT_PUBLIC_KEY is required")


def _check_webhooks(settings: Settings) -> None:
    if settings.webhook_url is not None and not settings.webhook_secret:
        raise ConfigError("FANOUT_WEBHOOK_URL needs FANOUT_WEBHOOK_SECRET (deliveries are signed)")


class _Reader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def _raw(self, name: str) -> str | None:
        value = self._env.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def optional(self, name: str) -> str | None:
        return self._raw(name)

    def flag(self, name: str, *, default: bool) -> bool:
        raw = self._raw(name)
        if raw is None:
            return default
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name} must be 0 or 1, got {raw!r}")

    def choice(self, name: str, default: str, allowed: tuple[str, ...]) -> str:
        raw = self._raw(name) or default
        if raw not in allowed:
            raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {raw!r}")
        return raw

    def number(
        self,
        name: str,
        default: T,
        kind: Callable[[str], T],
        *,
        low: float | None = None,
        high: float | None = None,
    ) -> T:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = kind(raw)
        except ValueError:
            noun = "a whole number" if kind is int else "a number"
            raise ConfigError(f"{name} must be {noun}, got {raw!r}") from None
        assert isinstance(value, int | float)
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"between {low} and {high}"
            raise ConfigError(f"{name} must be {bounds}, got {raw!r}")
        return value

    def optional_number(
        self, name: str, kind: Callable[[str], T], *, low: float | None = None
    ) -> T | None:
        if self._raw(name) is None:
            return None
        return self.number(name, kind("0"), kind, low=low)

    def port(self, name: str) -> int | None:
        if self._raw(name) is None:
            return None
        return self.number(name, 0, int, low=1, high=65535)

    def url(self, name: str, default: str, schemes: tuple[str, ...]) -> str:
        raw = self._raw(name) or default
        scheme = urlsplit(raw).scheme
        if scheme not in schemes:
            raise ConfigError(f"{name} must be a {'/'.join(schemes)}:// URL, got {raw!r}")
        return raw

    def optional_url(self, name: str, schemes: tuple[str, ...]) -> str | None:
        if self._raw(name) is None:
            return None
        return self.url(name, "", schemes)

    def csv(self, name: str) -> tuple[str, ...] | None:
        raw = self._raw(name)
        if raw is None:
            return None
        items = tuple(item.strip().rstrip("/") for item in raw.split(",") if item.strip())
        return items or None

    def generator(self, name: str, default: str) -> str:
        """`echo`, `openai` or a `module:callable` reference (loaded at worker start)."""
        raw = self._raw(name) or default
        module, colon, attribute = raw.partition(":")
        dotted = all(part.isidentifier() for part in module.split("."))
        if raw in ("echo", "openai") or (colon and dotted and attribute.isidentifier()):
            return raw
        raise ConfigError(f"{name} must be echo, openai or module:callable, got {raw!r}")

    def namespace(self, name: str) -> str:
        raw = self._raw(name) or ""
        if any(c in raw for c in "{}* \t"):
            raise ConfigError(f"{name} may not contain braces, '*' or spaces, got {raw!r}")
        # `eco` means keys `eco:channel:conv:p0` (what a KEDA trigger names), not
        # `ecochannel:conv:p0`; a prefix that already ends in ':' is kept as it is.
        return raw if not raw or raw.endswith(":") else f"{raw}:"
