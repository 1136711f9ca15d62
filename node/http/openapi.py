"""The HTTP API's documentation: routes, their limits and schemas, and the OpenAPI document.

A handler is registered with `@route(...)`, which records what the document says of
it; the router and the document read the same list, so they cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from common.store.lifecycle import SETTABLE, STATUSES

# Limits of the API: documented here and enforced by the handlers.
MAX_PARTICIPANTS = 100
MAX_TTL = 30 * 86400
PAGE_DEFAULT = 50
PAGE_MAX = 200

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Route:
    """A route and what the OpenAPI document says of it."""

    method: str
    path: str
    handler: Handler
    summary: str
    ok: tuple[int, str | None]  # status, response schema
    body: str | None
    query: tuple[str, ...]
    errors: tuple[int, ...]


ROUTES: list[Route] = []


def route(
    method: str,
    path: str,
    summary: str,
    ok: tuple[int, str | None],
    *,
    body: str | None = None,
    query: tuple[str, ...] = (),
    errors: tuple[int, ...] = (),
) -> Callable[[Handler], Handler]:
    """Register a handler with its documentation (400 and 401 are implied for every route)."""

    def register(handler: Handler) -> Handler:
        codes = tuple(sorted({400, 401, *errors}))
        ROUTES.append(Route(method, path, handler, summary, ok, body, query, codes))
        return handler

    return register


_ERRORS = {
    400: "bad body or parameter",
    401: "missing, invalid or expired token",
    403: "not allowed",
    404: "not found, or not visible to the caller",
    409: "the session's status does not allow this change",
}
_QUERY = {
    "status": ("string", "only sessions with this status"),
    "limit": ("integer", f"page size, 1 to {PAGE_MAX} (default {PAGE_DEFAULT})"),
    "cursor": ("string", "the `next` of the previous page"),
    "before": ("string", "the `next` of the previous page"),
}
_UNAUTHENTICATED = {
    "/api/v1/openapi.json": "This document",
    "/healthz": "Process alive",
    "/readyz": "Redis and Postgres reachable (503 while draining or when one is down)",
    "/metrics": "Prometheus metrics",
}
_STR, _INT, _OBJ = {"type": "string"}, {"type": "integer"}, {"type": "object"}
_TIME = {"type": "string", "format": "date-time"}
_AGENT = {"type": "string", "enum": ["ai", "human"]}
_TTL = {"type": "integer", "minimum": 1, "maximum": MAX_TTL}


def _ref(name: str) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}


def _object(props: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(required)}


def _page(item: str) -> dict[str, Any]:
    items = {"type": "array", "items": {"$ref": f"#/components/schemas/{item}"}}
    nxt = {"type": "string", "nullable": True, "description": "cursor; null on the last page"}
    return _object({"items": items, "next": nxt}, ("items", "next"))


def _operation(entry: Route) -> dict[str, Any]:
    code, schema = entry.ok
    ok = {"description": "success"} | (_ref(schema) if schema else {})
    params = [
        {"name": name[1:-1], "in": "path", "required": True, "schema": _STR}
        for name in entry.path.split("/")
        if name.startswith("{")
    ] + [
        {"name": q, "in": "query", "schema": {"type": _QUERY[q][0]}, "description": _QUERY[q][1]}
        for q in entry.query
    ]
    responses = {str(code): ok} | {
        str(e): {"description": _ERRORS[e]} | _ref("Error") for e in entry.errors
    }
    op: dict[str, Any] = {"summary": entry.summary, "parameters": params, "responses": responses}
    if entry.body:
        op["requestBody"] = {"required": True} | _ref(entry.body)
    return op


def _schemas() -> dict[str, Any]:
    session = {
        "id": _STR,
        "owner": _STR,
        "participants": {"type": "array", "items": _STR},
        "status": {"type": "string", "enum": sorted(STATUSES)},
        "agent": _AGENT,
        "metadata": _OBJ,
        "ttl": _INT,
        **{t: _TIME for t in ("created_at", "updated_at", "last_activity_at", "expires_at")},
    }
    message = {
        "id": _INT,
        "client_msg_id": _STR,
        "role": {"type": "string", "enum": ["user", "assistant", "agent", "system"]},
        "user_id": _STR,
        "device_id": {"type": "string", "nullable": True},
        "content": _STR,
        "metadata": _OBJ,
        "created_at": _TIME,
    }
    device = _object({"device_id": _STR, "connection_id": _STR, "node_id": _STR})
    return {
        "Error": _object({"error": _object({"code": _STR, "message": _STR})}, ("error",)),
        "Session": _object(session, tuple(session)),
        "SessionPage": _page("Session"),
        "NewSession": _object(
            {
                "participants": {"type": "array", "items": _STR, "maxItems": MAX_PARTICIPANTS},
                "agent": _AGENT,
                "ttl": _TTL,
                "metadata": _OBJ,
            }
        ),
        "SessionChange": _object(
            {
                "status": {"type": "string", "enum": sorted(SETTABLE)},
                "agent": _AGENT,
                "ttl": _TTL,
                "metadata": _OBJ | {"description": "replaces the metadata"},
            }
        ),
        "Participant": _object({"user_id": _STR}, ("user_id",)),
        "Message": _object(message, tuple(m for m in message if m != "metadata")),
        "MessagePage": _page("Message"),
        "Presence": _object(
            {
                "user_id": _STR,
                "online": {"type": "boolean"},
                "devices": {"type": "array", "items": device},
            }
        ),
    }


def document() -> dict[str, Any]:
    """The OpenAPI 3 document of every route a node serves over HTTP."""
    paths: dict[str, dict[str, Any]] = {}
    for entry in ROUTES:
        paths.setdefault(entry.path, {})[entry.method.lower()] = _operation(entry)
    plain = {"responses": {"200": {"description": "success"}}}
    for path, summary in _UNAUTHENTICATED.items():
        paths[path] = {"get": {"summary": summary, "security": []} | plain}
    paths["/ws"] = {"get": {"summary": "WebSocket (SPEC §4); token as header or ?token="} | plain}
    return {
        "openapi": "3.0.3",
        "info": {"title": "fanout", "version": "1"},
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": _schemas(),
        },
        "paths": paths,
    }
