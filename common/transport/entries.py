"""Entries on the conversation partition streams: client input on its way to a worker."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import orjson

from common.protocol import canonical_session_id


class BadEntry(ValueError):
    """A stream entry that cannot be decoded; it is dead-lettered, never retried."""


@dataclass(frozen=True, slots=True)
class ChatEntry:
    session_id: str
    client_msg_id: str
    user_id: str
    device_id: str
    content: str
    metadata: dict[str, Any] | None
    accepted_ms: int
    # Set only for a message a `service` token posted over HTTP (SPEC §6): `assistant`
    # or `system`. Otherwise the sender's participant role decides (user or agent).
    role: str | None = None

    def encode(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def decode(cls, data: bytes) -> ChatEntry:
        try:
            entry = cls(**orjson.loads(data))
            # Entries enqueued before ids were made canonical at the node may differ in case.
            session_id = canonical_session_id(entry.session_id)
        except (orjson.JSONDecodeError, TypeError, ValueError, AttributeError) as exc:
            raise BadEntry(f"undecodable chat entry: {exc}") from None
        return entry if session_id == entry.session_id else replace(entry, session_id=session_id)
