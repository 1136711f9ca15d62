"""The OpenAPI document (SPEC §6): valid OpenAPI 3.1, exactly the routes the node serves,
and the answers of a running node match the schemas it documents."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate

from common.config import Settings
from node.app import create_app
from node.http import openapi
from node.http.routes import Route, register
from tests.support.harness import Cluster, Proc, connect, is_type, token

AUTOMATIC = {"HEAD", "OPTIONS"}  # aiohttp answers these for a GET or a CORS preflight


@pytest.fixture
async def node(cluster: Cluster) -> Proc:
    return await cluster.node()


async def served_document(node: Proc) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{node.url}{openapi.PATH}") as resp,
    ):
        assert resp.status == 200 and resp.content_type == "application/json"
        doc: dict[str, Any] = await resp.json()
        return doc


def routed(app: web.Application) -> set[tuple[str, str]]:
    """(method, path) of every route in the app's router."""
    return {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.method not in AUTOMATIC and route.resource is not None
    }


def documented(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method, path) for path, ops in doc["paths"].items() for method in ops}


async def test_the_served_document_is_valid_openapi_3_1(node: Proc) -> None:
    doc = await served_document(node)
    assert doc["openapi"] == "3.1.0"
    validate(doc)  # raises on any violation of the OpenAPI 3.1 schema


async def test_the_document_lists_exactly_the_routes_the_node_serves(
    node: Proc, settings: Settings
) -> None:
    doc = await served_document(node)
    app = create_app(settings)  # the same routes as the node's; its resources never open
    served = routed(app)
    assert ("get", "/ws") in served and ("get", "/dashboard") in served
    assert documented(doc) == served
    assert {("get", openapi.PATH), ("get", "/metrics"), ("get", "/healthz")} <= served


async def test_a_route_outside_the_tables_is_caught(settings: Settings) -> None:
    """The comparison above fails both ways: an undocumented route, a document-only one."""
    app = create_app(settings)

    async def stray(request: web.Request) -> web.Response:
        return web.Response()

    app.router.add_get("/stray", stray)
    doc = openapi.document([*_tables()])
    assert documented(doc) != routed(app)
    assert ("get", "/stray") in routed(app) - documented(doc)
    ghost = Route("GET", "/ghost", stray, "Not served", ("meta",), auth="none")
    assert ("get", "/ghost") in documented(openapi.document([*_tables(), (ghost,)])) - routed(app)


def _tables() -> list[tuple[Route, ...]]:
    from node.app import TABLES

    return [*TABLES, openapi.table(*TABLES)]


def test_register_adds_each_route_with_its_handler() -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response()

    app = web.Application()
    register(app, (Route("POST", "/a/{x}", handler, "A", ("t",)),), ())
    [route] = [r for r in app.router.routes() if r.method == "POST"]
    assert route.handler is handler and route.resource is not None
    assert route.resource.canonical == "/a/{x}"


def test_every_operation_refuses_with_the_error_body_and_has_a_unique_id() -> None:
    doc = openapi.document(_tables())
    ids = [op["operationId"] for ops in doc["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids))
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            for status, answer in op["responses"].items():
                if int(status) >= 400 and not (path == "/readyz" and status == "503"):
                    schema = answer["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, (method, path)
    new = doc["components"]["schemas"]["NewSession"]
    assert "ttl" not in new.get("required", [])
    assert doc["paths"]["/admin/stats"]["get"]["responses"].keys() >= {"200", "401", "403"}


class Checker:
    """Checks a node's answers against the schemas its document gives for them."""

    def __init__(self, node: Proc, doc: dict[str, Any]) -> None:
        self.node, self.doc = node, doc

    async def call(
        self,
        method: str,
        template: str,
        user: str | None,
        *,
        expect: int,
        roles: list[str] | None = None,
        json: Any = None,
        query: dict[str, str] | None = None,
        **params: str,
    ) -> Any:
        path = template.format(**params)
        headers = {"Authorization": f"Bearer {token(user, roles=roles)}"} if user else {}
        async with (
            aiohttp.ClientSession() as http,
            http.request(
                method, f"{self.node.url}{path}", json=json, params=query, headers=headers
            ) as resp,
        ):
            assert resp.status == expect, (method, path, await resp.text())
            raw = await resp.read()
            media = resp.content_type if raw else None  # a 204 has no body, so no type
            body = orjson.loads(raw) if media == "application/json" else None
        answer = self.doc["paths"][template][method.lower()]["responses"][str(expect)]
        documented = {m.split(";")[0] for m in answer.get("content", {})}
        assert media in (documented or {None}), (method, template, media, documented)
        schema = answer.get("content", {}).get("application/json", {}).get("schema")
        assert (schema is None) == (body is None), (method, template, expect)
        if schema is not None:
            root = {**schema, "components": self.doc["components"]}
            OAS31Validator(root, format_checker=OAS31Validator.FORMAT_CHECKER).validate(body)
        return body


async def test_a_running_node_answers_as_its_document_says(cluster: Cluster, node: Proc) -> None:
    await cluster.worker()
    check = Checker(node, await served_document(node))
    one = "/api/v1/sessions/{session_id}"
    created = await check.call(
        "POST", "/api/v1/sessions", "ann", expect=201, json={"participants": ["bo"]}
    )
    sid = created["id"]
    await check.call("GET", "/api/v1/sessions", "ann", expect=200)
    await check.call("GET", one, "ann", expect=200, session_id=sid)
    await check.call("GET", one, "eve", expect=404, session_id=sid)
    await check.call("GET", one, None, expect=401, session_id=sid)
    await check.call("GET", one, "ann", expect=400, session_id="nope")
    await check.call("PATCH", one, "ann", expect=200, json={"status": "running"}, session_id=sid)
    await check.call("PATCH", one, "ann", expect=409, json={"status": "running"}, session_id=sid)
    await check.call(
        "POST", one + "/participants", "ann", expect=200, json={"user_id": "cy"}, session_id=sid
    )
    async with connect(node, "ann", "a1") as ann:
        await ann.chat(sid, "hello")
        await ann.until(is_type("message", message__role="assistant"))
        page = await check.call("GET", one + "/messages", "ann", expect=200, session_id=sid)
        assert len(page["items"]) == 2
        presence = await check.call(
            "GET", "/api/v1/presence/{user_id}", "ann", expect=200, user_id="ann"
        )
        assert presence["online"] is True
        connections = await check.call(
            "GET",
            "/admin/connections",
            "root",
            roles=["admin"],
            expect=200,
            query={"user_id": "ann"},
        )
        assert connections["items"][0]["device_id"] == "a1"
        await check.call("GET", "/admin/connections", "root", roles=["admin"], expect=200)
    await check.call("GET", "/admin/stats", "root", roles=["admin"], expect=200)
    await check.call("GET", "/admin/stats", "ann", expect=403)
    await check.call("GET", "/admin/history", "root", roles=["admin"], expect=200)
    notice = {"user_id": "ann", "title": "t", "body": "b"}
    await check.call("POST", "/admin/notify", "root", roles=["admin"], expect=200, json=notice)
    await check.call(
        "POST",
        "/admin/broadcast",
        "root",
        roles=["admin"],
        expect=200,
        json={"title": "t", "body": "b"},
    )
    await check.call(
        "POST",
        "/admin/users/{user_id}/disconnect",
        "root",
        roles=["admin"],
        expect=200,
        user_id="ann",
    )
    posted = {"client_msg_id": "m-1", "content": "over HTTP"}
    await check.call("POST", one + "/messages", "ann", expect=202, json=posted, session_id=sid)
    await check.call("POST", one + "/messages", "ann", expect=400, json={}, session_id=sid)
    member = one + "/participants/{user_id}"
    await check.call("DELETE", member, "ann", expect=204, session_id=sid, user_id="cy")
    await check.call("DELETE", member, "ann", expect=409, session_id=sid, user_id="ann")
    await check.call("DELETE", one, "ann", expect=204, session_id=sid)
    await check.call("GET", "/healthz", None, expect=200)
    await check.call("GET", "/readyz", None, expect=200)
    await check.call("GET", "/dashboard/{name}", None, expect=404, name="nothing.js")
    await check.call("GET", "/dashboard", None, expect=200)
    await check.call("GET", "/client/{name}", None, expect=200, name="fanout.js")
    await check.call("GET", "/client/{name}", None, expect=404, name="nothing.js")
    await check.call("GET", "/demo/{name}", None, expect=404, name="nothing.js")
    await check.call("GET", "/metrics", None, expect=200)
