"""Webhook signatures (SPEC §10): HMAC-SHA256 of "{timestamp}.{body}" with the secret.

The timestamp is signed with the body so a captured delivery cannot be replayed
later under a fresh timestamp; a receiver checks both (README "Webhooks").
"""

from __future__ import annotations

import hashlib
import hmac

SCHEME = "sha256="


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The `Fanout-Signature` value of a body sent at `timestamp` (Unix seconds)."""
    signed = str(timestamp).encode() + b"." + body
    return SCHEME + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def headers(secret: str, event_id: int, timestamp: int, body: bytes) -> dict[str, str]:
    """The headers of one delivery attempt."""
    return {
        "Content-Type": "application/json",
        "Fanout-Event-Id": str(event_id),
        "Fanout-Timestamp": str(timestamp),
        "Fanout-Signature": signature(secret, timestamp, body),
    }


def verify(
    secret: str, timestamp: str, sig: str, body: bytes, *, now: float, tolerance: float
) -> bool:
    """What a receiver does: the signature matches and the timestamp is recent."""
    if not timestamp.isdigit() or abs(now - int(timestamp)) > tolerance:
        return False
    return hmac.compare_digest(signature(secret, int(timestamp), body), sig)
