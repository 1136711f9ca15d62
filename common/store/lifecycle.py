"""The session state machine of SPEC §5, in one place.

This module only says which transitions are legal. Postgres enforces it: every
status change is one ``UPDATE … WHERE status = ANY(allowed_from(target))``, so of
two racing requests the row lock lets exactly one through (see common/store/sessions.py).
"""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"
    EXPIRED = "expired"


OPEN: frozenset[str] = frozenset({Status.PENDING, Status.RUNNING, Status.PAUSED})
FINAL: frozenset[str] = frozenset(
    {Status.COMPLETED, Status.CANCELLED, Status.FAILED, Status.EXPIRED}
)
STATUSES: frozenset[str] = OPEN | FINAL

# Target -> the statuses it may be reached from. Nothing leaves a final state, nothing
# returns to pending, and a status is never "changed" to itself (a retried PATCH gets
# 409, which is what makes "exactly one of N racing requests wins" hold).
_ALLOWED_FROM: dict[str, frozenset[str]] = {
    Status.RUNNING: frozenset({Status.PENDING, Status.PAUSED}),
    Status.PAUSED: frozenset({Status.RUNNING}),
    Status.COMPLETED: OPEN,
    Status.CANCELLED: OPEN,
    Status.FAILED: OPEN,
    Status.EXPIRED: OPEN,
}

# What a client may ask for with PATCH: `expired` is the sweeper's alone, and nothing
# ever goes back to `pending`.
SETTABLE: frozenset[str] = frozenset(
    {Status.RUNNING, Status.PAUSED, Status.COMPLETED, Status.CANCELLED, Status.FAILED}
)


class Refused(Exception):
    """A change the session's current status does not allow (HTTP 409)."""

    def __init__(self, current: str, message: str) -> None:
        super().__init__(message)
        self.current = current
        self.message = message


def is_open(status: str) -> bool:
    """True while a session takes messages (pending, running, paused)."""
    return status in OPEN


def allowed_from(target: str) -> frozenset[str]:
    """The statuses from which `target` may be reached (empty for none)."""
    return _ALLOWED_FROM.get(target, frozenset())


def can_change(current: str, target: str) -> bool:
    """True if `current` -> `target` is a legal transition."""
    return current in allowed_from(target)


def after_message(current: str) -> str:
    """The status after a message is stored: the first message starts a pending session."""
    return Status.RUNNING if current == Status.PENDING else current


def takes_assistant_reply(status: str, agent: str, role: str) -> bool:
    """True if a message from `role` gets an assistant reply (running, agent=ai, a user)."""
    return status == Status.RUNNING and agent == "ai" and role == "user"
