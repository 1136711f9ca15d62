"""The admin API (SPEC §6, §7) and the dashboard page.

Every `/admin/*` route needs a token with the `admin` role (401 without a valid
token, 403 without the role). Any node answers for the whole cluster: the stats,
the connection lists and the queue depth are read from Redis, and commands reach
the other nodes over the control channel (node/delivery/control.py).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from common.auth import Identity
from common.protocol import MAX_USER_ID, encode
from common.transport.cluster_stats import (
    HISTORY_SECONDS,
    queue_stats,
    read_history,
    read_processes,
    summarize,
    users_total,
)
from common.transport.queues import queue_depths
from common.transport.stats import NODE, WORKER
from node.delivery.control import BROADCAST, DISCONNECT, command
from node.http import schemas
from node.http.base import ApiError, authenticate, json_response, read_body
from node.http.routes import Route
from node.http.schemas import CONNECTIONS_DEFAULT, CONNECTIONS_MAX
from node.state import STATE, NodeState

log = logging.getLogger("fanout.admin")

LEVELS = ("info", "success", "warning", "error")
MAX_TITLE = 200
MAX_NOTIFY_ID = 64
STATIC = Path(__file__).parents[1] / "static"  # node/static
# The page and its two assets: nothing else is served from the folder.
ASSETS = {"dashboard.js": "application/javascript", "dashboard.css": "text/css"}
# The page loads only what this node serves (no CDN, no inline script).
PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def _admin(request: web.Request) -> tuple[NodeState, Identity]:
    state = request.app[STATE]
    identity = authenticate(state, request)
    if not identity.is_admin:
        raise ApiError(403, "FORBIDDEN", "the admin role is required")
    return state, identity


async def _publish(state: NodeState, payload: bytes) -> int:
    """Publish a command on the control channel; the number of nodes that received it."""
    channel = state.keys.control_channel
    if state.settings.redis_cluster:
        return int(await state.redis.spublish(channel, payload))
    return int(await state.redis.publish(channel, payload))


def _text(body: dict[str, Any], name: str, limit: int, *, in_bytes: bool = False) -> str:
    value = body.get(name)
    if isinstance(value, str) and 1 <= len(value.encode() if in_bytes else value) <= limit:
        return value
    unit = "bytes" if in_bytes else "characters"
    raise ApiError(400, "BAD_REQUEST", f"'{name}' must be a string of 1 to {limit} {unit}")


def _notification(state: NodeState, body: dict[str, Any]) -> dict[str, Any]:
    level = body.get("level", "info")
    if level not in LEVELS:
        raise ApiError(400, "BAD_REQUEST", f"'level' must be one of {', '.join(LEVELS)}")
    return {
        "type": "notification",
        "level": level,
        "title": _text(body, "title", MAX_TITLE),
        "body": _text(body, "body", state.settings.max_content, in_bytes=True),
    }


# -- reads --------------------------------------------------------------------------------


async def cluster_stats(request: web.Request) -> web.Response:
    """GET /admin/stats: every live node and worker, the totals and the queue."""
    state, _ = _admin(request)
    nodes = await read_processes(state.redis, state.keys, NODE)
    workers = await read_processes(state.redis, state.keys, WORKER)
    depths = await queue_depths(state.redis, state.keys, state.settings.partitions)
    owners = await state.redis.mget(
        [state.keys.partition_lease(p) for p in range(state.settings.partitions)]
    )
    users = await users_total(state.redis, state.keys, nodes)
    state.metrics.set_queue_depth(depths)
    queue = queue_stats(depths, owners)
    return json_response(
        {
            "nodes": nodes,
            "workers": workers,
            "totals": summarize(nodes, workers, queue["depth"], users),
            "queue": queue,
            "served_by": state.settings.node_id,
            "generated_at": int(time.time() * 1000),
            "lease_ttl_s": state.settings.lease_ttl,
            "interval_s": state.settings.stats_interval,
        }
    )


async def history(request: web.Request) -> web.Response:
    """GET /admin/history[?seconds=]: cluster totals over the last minutes, oldest first."""
    state, _ = _admin(request)
    seconds = _int_query(request, "seconds", HISTORY_SECONDS, HISTORY_SECONDS)
    points = await read_history(state.redis, state.keys, seconds)
    return json_response({"seconds": seconds, "points": points})


def _int_query(request: web.Request, name: str, default: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= high:
        raise ApiError(400, "BAD_REQUEST", f"'{name}' must be a whole number from 1 to {high}")
    return int(raw)


async def connections(request: web.Request) -> web.Response:
    """GET /admin/connections[?user_id=][&limit=]: connections across every node."""
    state, _ = _admin(request)
    limit = _int_query(request, "limit", CONNECTIONS_DEFAULT, CONNECTIONS_MAX)
    user_id = request.query.get("user_id")
    if user_id is not None:
        if not 1 <= len(user_id) <= MAX_USER_ID:
            raise ApiError(400, "BAD_REQUEST", "'user_id' must be 1 to 128 characters")
        items = await _user_connections(state, user_id)
        return json_response({"items": items[:limit], "total": len(items)})
    nodes = [n["id"] for n in await read_processes(state.redis, state.keys, NODE)]
    items, total = [], 0
    for node_id in nodes:
        key = state.keys.node_connections(node_id)
        total += int(await state.redis.hlen(key))
        cursor = 0
        while len(items) < limit:
            reply: Any = await state.redis.hscan(key, cursor, count=min(limit, 1000))
            cursor, found = reply
            items += [_connection(node_id, c, v) for c, v in found.items()][: limit - len(items)]
            if cursor == 0:
                break
    return json_response({"items": items, "total": total, "truncated": total > len(items)})


def _connection(node_id: str, conn_id: bytes, raw: bytes | None) -> dict[str, Any]:
    info: dict[str, Any] = {}
    if raw:
        try:
            info = orjson.loads(raw)
        except orjson.JSONDecodeError:
            info = {}
    return {"connection_id": conn_id.decode(), "node_id": node_id, **info}


async def _user_connections(state: NodeState, user_id: str) -> list[dict[str, Any]]:
    """One user's devices from the device registry (exact), with details from node hashes."""
    devices = await state.devices.online(user_id)
    items = []
    for device in devices:
        raw: Any = None
        if device["node_id"] and device["connection_id"]:
            raw = await state.redis.hget(
                state.keys.node_connections(device["node_id"]), device["connection_id"]
            )
        item = _connection(device["node_id"], device["connection_id"].encode(), raw)
        items.append({**item, "user_id": user_id, "device_id": device["device_id"]})
    return items


# -- commands -----------------------------------------------------------------------------


async def disconnect(request: web.Request) -> web.Response:
    """POST /admin/users/{user_id}/disconnect: close the user's sockets on every node (1008)."""
    state, identity = _admin(request)
    user_id = request.match_info["user_id"]
    if not 1 <= len(user_id) <= MAX_USER_ID:
        raise ApiError(400, "BAD_REQUEST", "the user id must be 1 to 128 characters")
    devices = await state.devices.online(user_id)
    nodes = await _publish(state, command(DISCONNECT, user_id.encode()))
    log.info(
        "admin %s disconnected user %s (%d device(s))", identity.user_id, user_id, len(devices)
    )
    return json_response({"user_id": user_id, "devices": len(devices), "nodes": nodes})


async def notify(request: web.Request) -> web.Response:
    """POST /admin/notify: a `notification` frame with seq to every device of one user."""
    state, _ = _admin(request)
    body = await read_body(request)
    user_id = _text(body, "user_id", MAX_USER_ID)
    frame = _notification(state, body)
    key = body.get("id")
    if key is not None and (not isinstance(key, str) or not 1 <= len(key) <= MAX_NOTIFY_ID):
        raise ApiError(400, "BAD_REQUEST", f"'id' must be a string of 1 to {MAX_NOTIFY_ID} chars")
    # With an id, a retried request keeps its first seq instead of notifying twice.
    seqs = await state.bus.deliver(
        [user_id], encode(frame)[1:], delivery_key=f"n{key}" if key else None
    )
    return json_response({"user_id": user_id, "seq": seqs[user_id]})


async def broadcast(request: web.Request) -> web.Response:
    """POST /admin/broadcast: the same frame, without seq, to every connected device."""
    state, identity = _admin(request)
    frame = _notification(state, await read_body(request))
    nodes = await _publish(state, command(BROADCAST, encode(frame)))
    log.info("admin %s broadcast %r to %d node(s)", identity.user_id, frame["title"], nodes)
    return json_response({"nodes": nodes})


# -- the page -----------------------------------------------------------------------------


async def dashboard(request: web.Request) -> web.StreamResponse:
    """GET /dashboard: the page (its data comes from /admin/*, with the admin token)."""
    response = web.FileResponse(STATIC / "dashboard.html")
    response.headers["Content-Security-Policy"] = PAGE_POLICY
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.content_type = "text/html"
    return response


async def dashboard_asset(request: web.Request) -> web.StreamResponse:
    """GET /dashboard/{name}: the page's script and style sheet."""
    name = request.match_info["name"]
    if name not in ASSETS:
        raise ApiError(404, "NOT_FOUND", "no such asset")
    response = web.FileResponse(STATIC / name)
    response.content_type = ASSETS[name]
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


_ADMIN, _PAGE = ("admin",), ("dashboard",)
ROUTES = (
    Route(
        "GET",
        "/admin/stats",
        cluster_stats,
        "Every live node and worker, totals, queue",
        _ADMIN,
        auth="admin",
        response=schemas.ClusterStats,
    ),
    Route(
        "GET",
        "/admin/history",
        history,
        "Cluster totals over the last minutes",
        _ADMIN,
        auth="admin",
        query=schemas.HistoryQuery,
        response=schemas.History,
    ),
    Route(
        "GET",
        "/admin/connections",
        connections,
        "Connections across every node",
        _ADMIN,
        auth="admin",
        query=schemas.ConnectionsQuery,
        response=schemas.Connections,
    ),
    Route(
        "POST",
        "/admin/users/{user_id}/disconnect",
        disconnect,
        "Close the user's sockets on every node (1008)",
        _ADMIN,
        auth="admin",
        response=schemas.Disconnected,
        errors=(400,),
    ),
    Route(
        "POST",
        "/admin/notify",
        notify,
        "A notification with seq to one user",
        _ADMIN,
        auth="admin",
        body=schemas.Notification,
        response=schemas.Notified,
    ),
    Route(
        "POST",
        "/admin/broadcast",
        broadcast,
        "A notification to every device",
        _ADMIN,
        auth="admin",
        body=schemas.Broadcast,
        response=schemas.Broadcasted,
    ),
    Route(
        "GET",
        "/dashboard",
        dashboard,
        "The dashboard page (its data needs an admin token)",
        _PAGE,
        auth="none",
        media=("text/html",),
    ),
    Route(
        "GET",
        "/dashboard/{name}",
        dashboard_asset,
        "The page's script and style sheet",
        _PAGE,
        auth="none",
        media=tuple(ASSETS.values()),
        errors=(404,),
    ),
)
