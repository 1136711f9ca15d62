"""The recent messages of the sessions a worker answers, kept as they pass through it.

Every message of a session is written by the worker that owns the session's partition
(chats, HTTP messages and the replies alike), so while it owns the partition that worker
sees each of them: the model's context can come from memory instead of a Postgres
query per reply — under load that query was a third of the openai reply's latency
(README, "Reply generators"). Postgres stays the source: a session is seeded from it on
first use, and whenever memory cannot prove it holds the answer, the query is made.

Completeness: a session's entry holds every model-visible message with id >= `floor`.
It is created before the seeding query is sent, so a message written meanwhile is
either in the query's snapshot or added by `seen` after its commit; `floor` is the
oldest id the query returned (0 when it returned fewer than asked: the whole session).
Trimming raises `floor`. The entries of a partition are dropped when it is given up
(another worker writes its sessions then), and sessions beyond MAX_SESSIONS are
forgotten least recently used first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from common.store.postgres import MessageRecord
from common.store.replies import MODEL_ROLES, Turn
from common.transport.keys import partition_of

# (session id, how many newest) -> (message id, turn) pairs, any order.
Seed = Callable[[str, int], Awaitable[list[tuple[int, Turn]]]]
# (session id, below this message id, how many) -> turns, oldest first (the query).
Query = Callable[[str, int, int], Awaitable[list[Turn]]]

MAX_SESSIONS = 10_000
# Messages kept beyond the context size: those that arrive while a reply waits its turn.
SLACK = 32


@dataclass(slots=True)
class _Session:
    turns: dict[int, Turn] = field(default_factory=dict)
    floor: int = 0
    seeded: bool = False


class RecentTurns:
    """Context for replies from memory, falling back to Postgres (see the module doc)."""

    def __init__(self, seed: Seed, query: Query, *, size: int, partitions: int) -> None:
        self._seed = seed
        self._query = query
        self._size = size
        self._keep = size + SLACK
        self._partitions = partitions
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def seen(self, message: MessageRecord) -> None:
        """A message was stored (by this worker): add it to its session's context."""
        entry = self._sessions.get(message.session_id)
        role = MODEL_ROLES.get(message.role)
        if entry is None or role is None:
            return
        entry.turns[message.id] = Turn(role, message.content)
        self._trim(entry)

    def forget_partition(self, partition: int) -> None:
        """The partition was given up: its sessions may change elsewhere now."""
        for session_id in [
            s for s in self._sessions if partition_of(s, self._partitions) == partition
        ]:
            del self._sessions[session_id]

    async def before(self, session_id: str, message_id: int, limit: int) -> list[Turn]:
        """The last `limit` context messages with ids below `message_id`, oldest first."""
        entry = self._sessions.get(session_id)
        if entry is None:
            entry = await self._seeded(session_id)
        else:
            self._sessions.move_to_end(session_id)
        if entry is not None and entry.seeded:
            ids = sorted(i for i in entry.turns if i < message_id)[-limit:]
            if len(ids) == limit or entry.floor == 0:
                self.hits += 1
                return [entry.turns[i] for i in ids]
        self.misses += 1
        return await self._query(session_id, message_id, limit)

    async def _seeded(self, session_id: str) -> _Session | None:
        entry = _Session()
        self._sessions[session_id] = entry  # before the query: see the module doc
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        try:
            rows = await self._seed(session_id, self._keep)
        except BaseException:
            self._sessions.pop(session_id, None)  # incomplete: never answer from it
            raise
        if self._sessions.get(session_id) is not entry:
            return None  # forgotten meanwhile (partition given up, evicted)
        entry.turns.update(rows)
        entry.floor = min(i for i, _ in rows) if len(rows) == self._keep else 0
        entry.seeded = True
        self._trim(entry)
        return entry

    def _trim(self, entry: _Session) -> None:
        if len(entry.turns) <= self._keep:
            return
        ids = sorted(entry.turns)
        for old in ids[: len(ids) - self._keep]:
            del entry.turns[old]
        entry.floor = max(entry.floor, ids[len(ids) - self._keep])
