"""Entries on the conversation partition streams: client input on its way to a worker."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import orjson


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

    def encode(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def decode(cls, data: bytes) -> ChatEntry:
        try:
            raw = orjson.loads(data)
            return cls(**raw)
        except (orjson.JSONDecodeError, TypeError) as exc:
            raise BadEntry(f"undecodable chat entry: {exc}") from None
