"""Every Redis key and channel name, in one place.

Keys of one user share the hash tag ``{user_id}`` so that the seq counter, the
delivery log and the user channel live in one Redis Cluster slot and can be touched
by one script (SPEC §2); a delivery's marker takes the tag of its users' slot
(`slot_tags`). A user id may hold any character, braces included, so the tag holds it
encoded (`user_tag`): a ``}`` in it would end the tag early and scatter one user's keys
over several slots.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

CONSUMER_GROUP = "workers"

# '%' first: the escape character escapes itself, so decoding is unambiguous.
_TAG_ESCAPES = (("%", "%25"), ("{", "%7B"), ("}", "%7D"))


def user_tag(user_id: str) -> str:
    """The user id as it appears inside a key's hash tag: without braces, reversibly."""
    if "{" not in user_id and "}" not in user_id and "%" not in user_id:
        return user_id
    for char, escaped in _TAG_ESCAPES:
        user_id = user_id.replace(char, escaped)
    return user_id


def user_from_tag(tag: str) -> str:
    """The inverse of `user_tag`."""
    if "%" not in tag:
        return tag
    for char, escaped in reversed(_TAG_ESCAPES):
        tag = tag.replace(escaped, char)
    return tag


@dataclass(frozen=True, slots=True)
class Keys:
    """Key and channel names under an optional namespace prefix."""

    ns: str = ""

    # -- per user (one slot: the hash tag is the user id) -----------------------------
    def user_channel(self, user_id: str) -> str:
        return f"{self.ns}channel:user:{{{user_tag(user_id)}}}"

    @property
    def user_channel_prefix(self) -> str:
        return f"{self.ns}channel:user:{{"

    @property
    def user_channel_pattern(self) -> str:
        return f"{self.ns}channel:user:*"

    def user_from_channel(self, channel: bytes) -> str:
        """The user id inside a user channel name."""
        return user_from_tag(channel[len(self.user_channel_prefix) : -1].decode())

    def seq(self, user_id: str) -> str:
        return f"{self.ns}seq:{{{user_tag(user_id)}}}"

    def log(self, user_id: str) -> str:
        return f"{self.ns}log:{{{user_tag(user_id)}}}"

    def delivered(self, tag: str, delivery_key: str) -> str:
        """A keyed delivery's marker (a hash: user -> seq), in the slot of hash tag `tag`
        (a slot's tag from `slot_tags`, or a user id for that user's slot)."""
        return f"{self.ns}dlv:{{{user_tag(tag)}}}:{delivery_key}"

    def devices(self, user_id: str) -> str:
        return f"{self.ns}devices:{{{user_tag(user_id)}}}"

    def device_conns(self, user_id: str) -> str:
        return f"{self.ns}devconn:{{{user_tag(user_id)}}}"

    def peer_buckets(self, user_id: str) -> str:
        """Hash of the user's rate buckets as a sender, one field per recipient."""
        return f"{self.ns}peer:{{{user_tag(user_id)}}}"

    # -- conversations ----------------------------------------------------------------
    def partition_stream(self, partition: int) -> str:
        return f"{self.ns}channel:conv:p{partition}"

    def dead_letters(self, partition: int) -> str:
        return f"{self.ns}channel:conv:p{partition}:dead"

    def partition_lease(self, partition: int) -> str:
        return f"{self.ns}lease:partition:{partition}"

    def owed_replies(self, partition: int) -> str:
        """Hash of the replies a partition's owner still owes (worker/assistant/owed.py)."""
        return f"{self.ns}owed:p{partition}"

    def session(self, session_id: str) -> str:
        return f"{self.ns}session:{session_id}"

    # -- cluster membership -----------------------------------------------------------
    def node_probe(self, node_id: str) -> str:
        """A channel only this node subscribes to: its pub/sub loop-back probe."""
        return f"{self.ns}channel:probe:{node_id}"

    @property
    def presence_nodes(self) -> str:
        """Sorted set of the node runs alive, each scored by when its lease ends: the
        devices a run holds are online while it is (node/presence.py)."""
        return f"{self.ns}presence:nodes"

    @property
    def sweeper_lease(self) -> str:
        """The expiry sweeper's lease (its value is the holder's worker id)."""
        return f"{self.ns}lease:sweeper"

    @property
    def webhook_lease(self) -> str:
        """The webhook dispatcher's lease: one worker delivers, so a session's events
        leave in order (worker/webhooks/dispatcher.py)."""
        return f"{self.ns}lease:webhooks"

    @property
    def sweeps(self) -> str:
        """A bounded list of recent sweeps, newest first (JSON: worker, start, end, counts)."""
        return f"{self.ns}sweeps"

    @property
    def workers(self) -> str:
        return f"{self.ns}workers"

    @property
    def worker_events(self) -> str:
        """Stream of workers joining, leaving and releasing partitions (hand-over wake-ups)."""
        return f"{self.ns}workers:events"

    # -- operations: stats, history, control (one hash tag: one Redis Cluster slot) ----
    def stats(self, kind: str, process_id: str) -> str:
        """One node's or worker's latest stats (a JSON string with a TTL)."""
        return f"{self.ns}{{stats}}:{kind}:{process_id}"

    def stats_users(self, node_id: str) -> str:
        """The set of users a node holds: the size of the nodes' union = distinct users."""
        return f"{self.ns}{{stats}}:users:{node_id}"

    @property
    def stats_users_total(self) -> str:
        """Distinct users across the cluster, counted by the historian (short TTL)."""
        return f"{self.ns}{{stats}}:users-total"

    def stats_index(self, kind: str) -> str:
        """Sorted set of the live processes of a kind, scored by when their stats expire."""
        return f"{self.ns}{{stats}}:{kind}s"

    def node_connections(self, node_id: str) -> str:
        """Hash of a node's connections: connection id -> JSON (user, device, since)."""
        return f"{self.ns}{{stats}}:conns:{node_id}"

    @property
    def stats_history(self) -> str:
        """Stream of cluster totals over the last minutes (the dashboard's charts)."""
        return f"{self.ns}{{stats}}:history"

    @property
    def stats_historian(self) -> str:
        """Lease of the one node that appends to the history."""
        return f"{self.ns}{{stats}}:historian"

    @property
    def control_channel(self) -> str:
        """Pub/sub channel every node listens on for admin commands (disconnect, broadcast)."""
        return f"{self.ns}control:nodes"


def partition_of(conversation_id: str, partitions: int) -> int:
    """The fixed partition of a conversation (stable across processes and restarts)."""
    return zlib.crc32(conversation_id.encode()) % partitions


@functools.cache
def slot_tags() -> tuple[str, ...]:
    """For each Redis Cluster slot, a short hash tag whose keys land in it.

    The first string of digits that hashes to each slot; built once (~0.2 s), the same
    in every process, so a key named with it is the same for every caller.
    """
    tags: list[str] = [""] * REDIS_CLUSTER_HASH_SLOTS
    missing, n = REDIS_CLUSTER_HASH_SLOTS, 0
    while missing:
        tag = str(n)
        slot = key_slot(tag.encode())
        if not tags[slot]:
            tags[slot] = tag
            missing -= 1
        n += 1
    return tuple(tags)
