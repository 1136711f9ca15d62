"""Every Redis key and channel name, in one place.

Keys of one user share the hash tag ``{user_id}`` so that the seq counter, the
delivery log, the dedupe markers and the user channel live in one Redis Cluster
slot and can be touched by one script (SPEC §2).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

CONSUMER_GROUP = "workers"


@dataclass(frozen=True, slots=True)
class Keys:
    """Key and channel names under an optional namespace prefix."""

    ns: str = ""

    # -- per user (one slot: the hash tag is the user id) -----------------------------
    def user_channel(self, user_id: str) -> str:
        return f"{self.ns}channel:user:{{{user_id}}}"

    @property
    def user_channel_prefix(self) -> str:
        return f"{self.ns}channel:user:{{"

    @property
    def user_channel_pattern(self) -> str:
        return f"{self.ns}channel:user:*"

    def user_from_channel(self, channel: bytes) -> str:
        """The user id inside a user channel name."""
        return channel[len(self.user_channel_prefix) : -1].decode()

    def seq(self, user_id: str) -> str:
        return f"{self.ns}seq:{{{user_id}}}"

    def log(self, user_id: str) -> str:
        return f"{self.ns}log:{{{user_id}}}"

    def delivered(self, user_id: str, delivery_key: str) -> str:
        return f"{self.ns}dlv:{{{user_id}}}:{delivery_key}"

    def devices(self, user_id: str) -> str:
        return f"{self.ns}devices:{{{user_id}}}"

    def device_conns(self, user_id: str) -> str:
        return f"{self.ns}devconn:{{{user_id}}}"

    # -- conversations ----------------------------------------------------------------
    def partition_stream(self, partition: int) -> str:
        return f"{self.ns}channel:conv:p{partition}"

    def dead_letters(self, partition: int) -> str:
        return f"{self.ns}channel:conv:p{partition}:dead"

    def partition_lease(self, partition: int) -> str:
        return f"{self.ns}lease:partition:{partition}"

    def session(self, session_id: str) -> str:
        return f"{self.ns}session:{session_id}"

    # -- cluster membership -----------------------------------------------------------
    @property
    def workers(self) -> str:
        return f"{self.ns}workers"


def partition_of(conversation_id: str, partitions: int) -> int:
    """The fixed partition of a conversation (stable across processes and restarts)."""
    return zlib.crc32(conversation_id.encode()) % partitions
