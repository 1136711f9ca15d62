"""The HTTP API's bodies as types: what a request sends and a response returns (SPEC §6).

They are msgspec Structs so the OpenAPI document's schemas are generated from them
(node/http/openapi.py); the handlers validate by hand and answer with the same fields.
A limit named here is the one the handlers enforce.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from msgspec import UNSET, Meta, Struct, UnsetType

from common.store.lifecycle import SETTABLE, STATUSES
from common.transport.cluster_stats import HISTORY_SECONDS

# Limits of the API: documented here and enforced by the handlers.
MAX_TTL = 30 * 86400
PAGE_DEFAULT = 50
PAGE_MAX = 200
CONNECTIONS_DEFAULT = 1000
CONNECTIONS_MAX = 10_000

Agent = Literal["ai", "human"]
Status = Annotated[str, Meta(extra_json_schema={"enum": sorted(STATUSES)})]
SettableStatus = Annotated[str, Meta(extra_json_schema={"enum": sorted(SETTABLE)})]
Ttl = Annotated[int, Meta(ge=1, le=MAX_TTL, description="seconds")]
Limit = Annotated[int, Meta(ge=1, le=PAGE_MAX, description="page size")]
Cursor = Annotated[str | None, Meta(description="cursor; null on the last page")]
Metadata = dict[str, Any]


class ErrorDetail(Struct):
    code: str
    message: str


class Error(Struct):
    """Every refusal: a stable code and a message for people."""

    error: ErrorDetail


# -- sessions -----------------------------------------------------------------------------


class Session(Struct):
    """A conversation: who is in it, its status (SPEC §5) and when it expires."""

    id: str
    owner: str
    participants: list[str]
    status: Status
    agent: Agent
    metadata: Metadata
    ttl: int
    created_at: datetime
    updated_at: datetime
    last_activity_at: datetime
    expires_at: datetime


class SessionPage(Struct):
    items: list[Session]
    next: Cursor


class NewSession(Struct):
    """The caller owns the new session; it starts `pending`."""

    participants: Annotated[
        list[str], Meta(description="at most FANOUT_MAX_PARTICIPANTS (default 100) with the owner")
    ] = []
    agent: Agent = "ai"
    ttl: Ttl | UnsetType = UNSET  # left out: FANOUT_SESSION_TTL
    metadata: Metadata = {}


class SessionChange(Struct):
    """At least one field; `metadata` replaces the metadata."""

    status: SettableStatus | None = None
    agent: Agent | None = None
    ttl: Ttl | None = None
    metadata: Metadata | None = None


class Participant(Struct):
    user_id: str


class NewMessage(Struct):
    """A message posted over HTTP: a chat frame's fields, and a role for service tokens."""

    client_msg_id: Annotated[str, Meta(min_length=1, max_length=64)]
    content: str
    metadata: Metadata | UnsetType = UNSET
    role: Literal["user", "agent", "assistant", "system"] | UnsetType = UNSET


class Accepted(Struct):
    """Durably enqueued; the message is stored (once) and delivered by a worker."""

    client_msg_id: str
    session_id: str


class Message(Struct):
    id: int
    client_msg_id: str
    role: Literal["user", "assistant", "agent", "system"]
    user_id: str
    device_id: str | None
    content: str
    created_at: datetime
    metadata: Metadata = {}


class MessagePage(Struct):
    items: list[Message]
    next: Cursor


class Device(Struct):
    device_id: str
    connection_id: str
    node_id: str


class Presence(Struct):
    user_id: str
    online: bool
    devices: list[Device]


class SessionQuery(Struct):
    status: Annotated[Status | None, Meta(description="only sessions with this status")] = None
    limit: Limit = PAGE_DEFAULT
    cursor: Annotated[str | None, Meta(description="the `next` of the previous page")] = None


class MessageQuery(Struct):
    limit: Limit = PAGE_DEFAULT
    before: Annotated[str | None, Meta(description="the `next` of the previous page")] = None


# -- admin --------------------------------------------------------------------------------

Level = Literal["info", "success", "warning", "error"]


class Partition(Struct):
    partition: int
    depth: int
    owner: Annotated[str | None, Meta(description="the worker holding its lease")] = None


class Queue(Struct):
    depth: int
    partitions: list[Partition]


class ClusterStats(Struct):
    """Every live node and worker (their own records), the totals and the queue."""

    nodes: list[dict[str, Any]]
    workers: list[dict[str, Any]]
    totals: dict[str, Any]
    queue: Queue
    served_by: str
    generated_at: Annotated[int, Meta(description="milliseconds since the epoch")]
    lease_ttl_s: float
    interval_s: float


class History(Struct):
    seconds: int
    points: list[dict[str, Any]]


class HistoryQuery(Struct):
    seconds: Annotated[int, Meta(ge=1, le=HISTORY_SECONDS, description="how far back")] = (
        HISTORY_SECONDS
    )


class Connections(Struct):
    items: list[dict[str, Any]]
    total: int
    truncated: Annotated[bool, Meta(description="absent for one user")] = False


class ConnectionsQuery(Struct):
    user_id: Annotated[str | None, Meta(description="one user's devices only")] = None
    limit: Annotated[int, Meta(ge=1, le=CONNECTIONS_MAX)] = CONNECTIONS_DEFAULT


class DeadLetter(Struct):
    id: Annotated[str, Meta(description="the event id (Fanout-Event-Id)")]
    session_id: str
    type: Literal["message.created", "session.updated", "session.deleted"]
    created_at: datetime
    dead_at: datetime
    attempts: int
    last_error: str | None


class DeadLetters(Struct):
    """Webhook events given up on after FANOUT_WEBHOOK_MAX_AGE, and the outbox backlog."""

    enabled: Annotated[bool, Meta(description="FANOUT_WEBHOOK_URL is set on this node")]
    items: list[DeadLetter]
    total: int
    waiting: Annotated[int, Meta(description="events not yet delivered")]
    oldest_age_s: Annotated[float, Meta(description="age of the oldest of them; 0 if none")]


class DeadLettersQuery(Struct):
    limit: Annotated[int, Meta(ge=1, le=500)] = 50


class Disconnected(Struct):
    user_id: str
    devices: int
    nodes: Annotated[int, Meta(description="nodes that received the command")]


class Notification(Struct):
    """A `notification` frame with seq to every device of one user."""

    user_id: str
    title: str
    body: str
    level: Level = "info"
    id: Annotated[str | None, Meta(description="a retry with the same id notifies once")] = None


class Notified(Struct):
    user_id: str
    seq: int


class Broadcast(Struct):
    """The same frame, without seq, to every connected device."""

    title: str
    body: str
    level: Level = "info"


class Broadcasted(Struct):
    nodes: int


# -- health and the WebSocket -------------------------------------------------------------


class Alive(Struct):
    status: Literal["ok"]


class Readiness(Struct):
    status: Literal["ready", "unavailable", "draining"]
    redis: Annotated[str, Meta(description="'ok' or 'down: <reason>'")]
    postgres: Annotated[str, Meta(description="'ok' or 'down: <reason>'")]


class WebSocketQuery(Struct):
    """The upgrade's query (SPEC §4); the token comes as a bearer header or `?token=`."""

    device_id: Annotated[str, Meta(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
    session_id: Annotated[str | None, Meta(description="a session UUID")] = None
    last_seq: Annotated[int, Meta(ge=0, description="resume after this seq")] | None = None
