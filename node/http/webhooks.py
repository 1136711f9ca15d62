"""Webhook dead letters for operators: GET /admin/webhooks/dead-letters (SPEC §10).

Events the dispatcher gave up on after FANOUT_WEBHOOK_MAX_AGE, newest first, and
what still waits in the outbox (how many, how old the oldest is). The dashboard
shows the same.
"""

from __future__ import annotations

from aiohttp import web

from common.store.outbox import Outbox
from node.http import schemas
from node.http.admin import _admin, _int_query
from node.http.base import json_response
from node.http.routes import Route

DEAD_LETTERS_DEFAULT = 50
DEAD_LETTERS_MAX = 500


async def dead_letters(request: web.Request) -> web.Response:
    """GET /admin/webhooks/dead-letters[?limit=]: newest first, with the outbox backlog."""
    state, _ = _admin(request)
    limit = _int_query(request, "limit", DEAD_LETTERS_DEFAULT, DEAD_LETTERS_MAX)
    outbox = Outbox(state.store)
    items = await outbox.dead_letters(limit)
    waiting, oldest = await outbox.backlog()
    return json_response(
        {
            "enabled": state.settings.webhook_url is not None,
            "items": [d.to_json() for d in items],
            "total": await outbox.dead_letter_count(),
            "waiting": waiting,
            "oldest_age_s": round(oldest, 3),
        }
    )


ROUTES = (
    Route(
        "GET",
        "/admin/webhooks/dead-letters",
        dead_letters,
        "Webhook events given up on (newest first) and the outbox backlog",
        ("admin",),
        auth="admin",
        query=schemas.DeadLettersQuery,
        response=schemas.DeadLetters,
    ),
)
