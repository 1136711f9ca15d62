"""The browser client and its demo page (SPEC §11): static files, served by every node."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from node.http.base import ApiError
from node.http.routes import Route

STATIC = Path(__file__).parents[1] / "static"  # node/static
CLIENT = STATIC / "client"
# Only these files are served: nothing else in the folders is reachable.
CLIENT_FILES = {
    "fanout.js": "text/javascript",
    "fanout.d.ts": "application/typescript",
}
DEMO_ASSETS = {"demo.js": "text/javascript", "demo.css": "text/css"}
# The demo loads only this node's files (no CDN, no inline script); its sockets and
# API calls may go to any node of the cluster, whose URLs the user types in.
DEMO_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self' http: https: ws: wss:; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def _file(path: Path, content_type: str) -> web.FileResponse:
    response = web.FileResponse(path)
    response.content_type = content_type
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


async def client_file(request: web.Request) -> web.StreamResponse:
    """GET /client/{name}: the ES module and its TypeScript declarations."""
    name = request.match_info["name"]
    if name not in CLIENT_FILES:
        raise ApiError(404, "NOT_FOUND", "no such file")
    return _file(CLIENT / name, CLIENT_FILES[name])


async def demo(request: web.Request) -> web.StreamResponse:
    """GET /demo: a small chat page built on the client."""
    response = _file(STATIC / "demo.html", "text/html")
    response.headers["Content-Security-Policy"] = DEMO_POLICY
    return response


async def demo_asset(request: web.Request) -> web.StreamResponse:
    """GET /demo/{name}: the page's script and style sheet."""
    name = request.match_info["name"]
    if name not in DEMO_ASSETS:
        raise ApiError(404, "NOT_FOUND", "no such file")
    return _file(STATIC / name, DEMO_ASSETS[name])


_CLIENT = ("client",)
ROUTES = (
    Route(
        "GET",
        "/client/{name}",
        client_file,
        "The browser client: fanout.js (an ES module) and fanout.d.ts",
        _CLIENT,
        auth="none",
        media=tuple(CLIENT_FILES.values()),
        errors=(404,),
    ),
    Route(
        "GET",
        "/demo",
        demo,
        "A demo chat page on the browser client",
        _CLIENT,
        auth="none",
        media=("text/html",),
    ),
    Route(
        "GET",
        "/demo/{name}",
        demo_asset,
        "The demo page's script and style sheet",
        _CLIENT,
        auth="none",
        media=tuple(DEMO_ASSETS.values()),
        errors=(404,),
    ),
)
