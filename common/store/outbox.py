"""The webhook outbox: events committed with their change, until delivered (SPEC §10).

Writing. Triggers of migration 4 (common/store/migrations/m4_outbox.py) insert a row for every
stored message (`message.created`), every change of a session's status, agent or
participants (`session.updated`) and every deleted session (`session.deleted`), in
the transaction of the change: a change that rolls back leaves no event, and a
committed one cannot lose its event to a crash. They write only on connections of a
process with webhooks on (`Store.open(webhooks=True)`).

Reading. The dispatcher (worker/webhooks/) takes the head of each session's queue
(the lowest id left of that session) when it is due; the next event of a session
waits until the head is delivered or dead-lettered, so a receiver sees a session's
events in order. Every change of a session holds its row lock, so its events take
their ids in commit order.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from common.store.postgres import Store, iso_time

# Heads that are due, oldest first, leaving out sessions already in flight.
_DUE = """
SELECT o.* FROM webhook_outbox o
WHERE o.next_attempt_at <= now() AND NOT (o.session_id = ANY($1::uuid[]))
  AND NOT EXISTS (
      SELECT 1 FROM webhook_outbox e WHERE e.session_id = o.session_id AND e.id < o.id)
ORDER BY o.next_attempt_at, o.id
LIMIT $2
"""
# The same heads, each with up to $3 events of its session from the head on, in order:
# the dispatcher sends a session's run back to back without a query per event.
_DUE_RUNS = """
WITH heads AS (
    SELECT o.session_id, o.next_attempt_at, o.id FROM webhook_outbox o
    WHERE o.next_attempt_at <= now() AND NOT (o.session_id = ANY($1::uuid[]))
      AND NOT EXISTS (
          SELECT 1 FROM webhook_outbox e WHERE e.session_id = o.session_id AND e.id < o.id)
    ORDER BY o.next_attempt_at, o.id
    LIMIT $2
)
SELECT r.* FROM heads h CROSS JOIN LATERAL (
    SELECT * FROM webhook_outbox e WHERE e.session_id = h.session_id ORDER BY e.id LIMIT $3
) r
ORDER BY h.next_attempt_at, h.id, r.id
"""
_RETRY = """
UPDATE webhook_outbox SET attempts = attempts + 1, last_error = $2,
    next_attempt_at = now() + $3::float8 * interval '1 second'
WHERE id = $1
"""
_DEAD = """
WITH gone AS (DELETE FROM webhook_outbox WHERE id = $1 RETURNING *)
INSERT INTO webhook_dead_letters (id, session_id, type, payload, created_at, attempts, last_error)
SELECT id, session_id, type, payload, created_at, attempts + 1, $2 FROM gone
ON CONFLICT (id) DO NOTHING
"""


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """One undelivered event: its id is the webhook's `id` and `Fanout-Event-Id`."""

    id: int
    session_id: str
    type: str
    payload: dict[str, Any]
    created_at: datetime
    attempts: int

    def body(self) -> bytes:
        """The JSON POSTed to the receiver: {id, type, created_at, data}."""
        return orjson.dumps(
            {
                "id": str(self.id),
                "type": self.type,
                "created_at": iso_time(self.created_at),
                "data": event_data(self.type, self.payload),
            }
        )


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An event given up on after FANOUT_WEBHOOK_MAX_AGE."""

    id: int
    session_id: str
    type: str
    created_at: datetime
    dead_at: datetime
    attempts: int
    last_error: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "session_id": self.session_id,
            "type": self.type,
            "created_at": iso_time(self.created_at),
            "dead_at": iso_time(self.dead_at),
            "attempts": self.attempts,
            "last_error": self.last_error,
        }


def event_data(kind: str, payload: dict[str, Any]) -> dict[str, Any]:
    """The `data` of an event, shaped like the HTTP API's session and message objects."""
    if kind == "message.created":
        row = payload["message"]
        message = {
            "id": row["id"],
            "client_msg_id": row["client_msg_id"],
            "role": row["role"],
            "user_id": row["user_id"],
            "device_id": row["device_id"],
            "content": row["content"],
            "created_at": _time(row["created_at"]),
        }
        if row.get("metadata"):
            message["metadata"] = row["metadata"]
        return {"session_id": row["session_id"], "message": message}
    row = payload["session"]
    session = {
        "id": row["id"],
        "owner": row["owner"],
        "participants": payload["participants"],
        "status": row["status"],
        "agent": row["agent"],
        "metadata": row["metadata"],
        "ttl": row["ttl"],
        **{
            name: _time(row[name])
            for name in ("created_at", "updated_at", "last_activity_at", "expires_at")
        },
    }
    data: dict[str, Any] = {"session": session}
    if kind == "session.updated":
        data["changes"] = payload["changes"]
    return data


def _time(value: str) -> str:
    """A timestamp as Postgres put it in JSON, written the way the HTTP API writes it."""
    return iso_time(datetime.fromisoformat(value).astimezone(UTC))


def _event(row: asyncpg.Record) -> OutboxEvent:
    return OutboxEvent(
        id=row["id"],
        session_id=str(row["session_id"]),
        type=row["type"],
        payload=orjson.loads(row["payload"]),
        created_at=row["created_at"],
        attempts=row["attempts"],
    )


class Outbox:
    """Queries of the outbox and its dead letters."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def due(self, busy: set[str], limit: int) -> list[OutboxEvent]:
        """Up to `limit` session heads that are due, none of a session in `busy`."""
        rows = await self._store.fetch(_DUE, [uuid.UUID(s) for s in busy], limit)
        return [_event(r) for r in rows]

    async def due_runs(self, busy: set[str], limit: int, run: int) -> list[list[OutboxEvent]]:
        """Up to `limit` sessions whose head is due, none in `busy`, each with up to `run`
        of its events from the head on, in order (one round trip for all)."""
        rows = await self._store.fetch(_DUE_RUNS, [uuid.UUID(s) for s in busy], limit, run)
        runs: list[list[OutboxEvent]] = []
        for row in rows:
            event = _event(row)
            if runs and runs[-1][0].session_id == event.session_id:
                runs[-1].append(event)
            else:
                runs.append([event])
        return runs

    async def delivered(self, event_ids: list[int]) -> None:
        """Remove delivered events, in one statement."""
        await self._store.execute(
            "DELETE FROM webhook_outbox WHERE id = ANY($1::bigint[])", event_ids
        )

    async def retry_later(self, event_id: int, error: str, delay: float) -> None:
        await self._store.execute(_RETRY, event_id, error[:500], delay)

    async def dead_letter(self, event_id: int, error: str) -> None:
        await self._store.execute(_DEAD, event_id, error[:500])

    async def oldest_age(self) -> float:
        """Seconds since the oldest undelivered event was recorded; 0 when none waits."""
        age: float | None = await self._store.fetchval(
            "SELECT extract(epoch FROM now() - min(created_at))::float8 FROM webhook_outbox"
        )
        return max(0.0, age or 0.0)

    async def backlog(self) -> tuple[int, float]:
        """How many events wait, and the oldest one's age in seconds (0 when none)."""
        row = await self._store.fetchrow(
            "SELECT count(*) AS n,"
            " coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS age"
            " FROM webhook_outbox"
        )
        assert row is not None
        return int(row["n"]), max(0.0, float(row["age"]))

    async def dead_letter_count(self) -> int:
        count: int = await self._store.fetchval("SELECT count(*) FROM webhook_dead_letters")
        return count

    async def dead_letters(self, limit: int) -> list[DeadLetter]:
        """The most recent dead letters, newest first."""
        rows = await self._store.fetch(
            "SELECT id, session_id, type, created_at, dead_at, attempts, last_error"
            " FROM webhook_dead_letters ORDER BY dead_at DESC, id DESC LIMIT $1",
            limit,
        )
        return [
            DeadLetter(
                id=r["id"],
                session_id=str(r["session_id"]),
                type=r["type"],
                created_at=r["created_at"],
                dead_at=r["dead_at"],
                attempts=r["attempts"],
                last_error=r["last_error"],
            )
            for r in rows
        ]
