"""Every route a node serves, as typed records: the router and the OpenAPI document read them.

Each handler module ends with its table, `ROUTES: tuple[Route, ...]`; node/app.py passes
the tables to `register`, and node/http/openapi.py builds /api/v1/openapi.json from the
same tables, so a served route cannot be left out of the document (tests/api/test_openapi.py
fails if one is).

Adding a route is one entry in the handler module's table, for example:

    Route("DELETE", _ONE + "/participants/{user_id}", remove_participant,
          "Remove a participant, or leave", tags=("sessions",), status=204,
          errors=(403, 404, 409)),

with its request and response bodies as msgspec Structs in node/http/schemas.py
(`body=`, `response=`, `query=`). A new handler module also adds its `ROUTES` to
`TABLES` in node/app.py.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from aiohttp import web
from msgspec import Struct

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# none: no token; token: a valid JWT (401 without); admin: a JWT with the admin role (403).
Auth = Literal["none", "token", "admin"]


@dataclass(frozen=True, slots=True)
class Route:
    """One method on one path, its handler, and what the OpenAPI document says of it.

    `response` is the JSON body of a success; a body that is not JSON is named by its
    media types in `media` instead (a page, a script, metrics). `errors` are the
    statuses refused with the `Error` body besides those implied: 401 for a token,
    403 for the admin role, 400 for a body or query, 408 for a body, 503 where Redis or Postgres is
    behind the answer (every route with a token). `also` are statuses answered with the
    success's body too (a 503 /readyz says what is down). `query_token`: the token may
    come as `?token=` instead of a header (the WebSocket, which browsers cannot give one).
    """

    method: str
    path: str
    handler: Handler
    summary: str
    tags: tuple[str, ...]
    auth: Auth = "token"
    status: int = 200
    response: type[Struct] | None = None
    media: tuple[str, ...] = ()
    body: type[Struct] | None = None
    query: type[Struct] | None = None
    errors: tuple[int, ...] = ()
    also: tuple[int, ...] = ()
    query_token: bool = False

    def refusals(self) -> tuple[int, ...]:
        """Every status this route answers with the `Error` body."""
        implied = set(self.errors)
        if self.auth != "none":
            implied |= {401, 503}
        if self.auth == "admin":
            implied.add(403)
        if self.body is not None or self.query is not None:
            implied.add(400)
        if self.body is not None:
            implied.add(408)  # node/http/deadlines.py
        return tuple(sorted(implied - set(self.also)))


def register(app: web.Application, *tables: Iterable[Route]) -> None:
    """Add every route of the tables to the app's router (a GET answers HEAD too)."""
    for table in tables:
        for entry in table:
            if entry.method == "GET":
                app.router.add_get(entry.path, entry.handler)
            else:
                app.router.add_route(entry.method, entry.path, entry.handler)
