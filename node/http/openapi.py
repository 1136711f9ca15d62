"""The OpenAPI 3.1 document at /api/v1/openapi.json, generated from the route tables.

Paths and operations come from the `Route` records (node/http/routes.py), schemas from
the msgspec Structs they name (node/http/schemas.py): nothing here lists a route or a
field by hand, so the document describes exactly what the router serves.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import msgspec
import orjson
from aiohttp import web

from node.http.routes import Route
from node.http.schemas import Error

PATH = "/api/v1/openapi.json"
_REF = "#/components/schemas/{name}"
_PARAM = re.compile(r"\{(\w+)\}")
_PATH_PARAMS: dict[str, dict[str, Any]] = {"session_id": {"type": "string", "format": "uuid"}}
_SUCCESS = {
    101: "switched to the WebSocket protocol (docs/protocol.md)",
    200: "success",
    201: "created",
    202: "accepted",
    204: "done; no body",
}
_REFUSED = {
    400: "bad body or parameter",
    401: "missing, invalid or expired token",
    403: "not allowed",
    404: "not found, or not visible to the caller",
    408: "request body not complete within FANOUT_HTTP_BODY_TIMEOUT; the connection is closed",
    409: "the session's state does not allow this (status, participant cap, the owner)",
    413: "content over FANOUT_MAX_CONTENT",
    429: "too many: retry later",
    503: "Redis or Postgres unavailable, or the node is draining: retry",
}
_SECURITY = {
    "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
    "token_query": {"type": "apiKey", "in": "query", "name": "token"},
}


def document(tables: Iterable[Iterable[Route]]) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route in the tables."""
    routes = [entry for table in tables for entry in table]
    bodies = {t for r in routes for t in (r.response, r.body) if t is not None}
    queries = {r.query for r in routes if r.query is not None}
    typed = sorted(bodies | queries | {Error}, key=lambda t: t.__name__)
    _, schemas = msgspec.json.schema_components(typed, ref_template=_REF)
    queried = {q.__name__: schemas.pop(q.__name__) for q in queries}
    paths: dict[str, dict[str, Any]] = {}
    for entry in routes:
        paths.setdefault(entry.path, {})[entry.method.lower()] = _operation(entry, queried)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "fanout",
            "version": "1",
            "description": "A fanout node's HTTP API; the WebSocket protocol is in "
            "docs/protocol.md.",
        },
        "security": [{"bearer": []}],
        "tags": [{"name": tag} for tag in sorted({t for r in routes for t in r.tags})],
        "paths": paths,
        "components": {"securitySchemes": _SECURITY, "schemas": schemas},
    }


def table(*tables: Iterable[Route]) -> tuple[Route, ...]:
    """The route serving the document of the tables and of itself."""
    served: list[bytes] = []

    async def openapi(request: web.Request) -> web.Response:
        """GET /api/v1/openapi.json (no token)."""
        return web.Response(body=served[0], content_type="application/json")

    own = Route(
        "GET",
        PATH,
        openapi,
        "This document",
        tags=("meta",),
        auth="none",
        media=("application/json",),
    )
    served.append(orjson.dumps(document([*tables, (own,)])))
    return (own,)


def _operation(entry: Route, queried: dict[str, Any]) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": entry.handler.__name__,
        "summary": entry.summary,
        "tags": list(entry.tags),
        "parameters": _path_parameters(entry.path) + _query_parameters(entry, queried),
        "responses": _responses(entry),
    }
    if entry.auth == "none":
        operation["security"] = []
    elif entry.query_token:
        operation["security"] = [{"bearer": []}, {"token_query": []}]
    if entry.auth == "admin":
        operation["description"] = "Needs a token with the `admin` role."
    if entry.body is not None:
        operation["requestBody"] = {"required": True, "content": _json(entry.body)}
    return operation


def _path_parameters(path: str) -> list[dict[str, Any]]:
    return [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": _PATH_PARAMS.get(name, {"type": "string"}),
        }
        for name in _PARAM.findall(path)
    ]


def _query_parameters(entry: Route, queried: dict[str, Any]) -> list[dict[str, Any]]:
    if entry.query is None:
        return []
    schema = queried[entry.query.__name__]
    required = set(schema.get("required", ()))
    parameters = []
    for name, field_schema in schema["properties"].items():
        field = _absent_not_null(field_schema)
        parameter = {"name": name, "in": "query", "required": name in required}
        if "description" in field:
            parameter["description"] = field.pop("description")
        parameters.append(parameter | {"schema": field})
    return parameters


def _absent_not_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A query parameter is left out rather than null: `X | None = None` is an optional X."""
    options: list[dict[str, Any]] = [
        option for option in schema.get("anyOf", ()) if option != {"type": "null"}
    ]
    if len(options) != 1 or schema.get("default", 0) is not None:
        return dict(schema)
    rest = {k: v for k, v in schema.items() if k not in ("anyOf", "default")}
    return options[0] | rest


def _responses(entry: Route) -> dict[str, Any]:
    success: dict[str, Any] = {"description": _SUCCESS[entry.status]}
    if entry.response is not None:
        success["content"] = _json(entry.response)
    elif entry.media:
        success["content"] = {
            media: {"schema": {"type": "object" if media == "application/json" else "string"}}
            for media in entry.media
        }
    responses = {str(entry.status): success}
    for status in entry.also:
        responses[str(status)] = success | {"description": _REFUSED[status]}
    for status in entry.refusals():
        responses[str(status)] = {"description": _REFUSED[status], "content": _json(Error)}
    return responses


def _json(body: type[msgspec.Struct]) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": _REF.format(name=body.__name__)}}}
