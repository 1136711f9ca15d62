"""CORS on the HTTP API (SPEC §6): preflights answered, the origin granted on every answer."""

from __future__ import annotations

import aiohttp

from tests.support.harness import Cluster, create_session, token

APP = "https://app.example"
OTHER = "https://evil.example"


def preflight(method: str, origin: str) -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "authorization,content-type",
    }


async def test_cors_for_an_allowed_origin_and_none_for_others(cluster: Cluster) -> None:
    node = await cluster.node(FANOUT_ALLOWED_ORIGINS=f"{APP},https://other.example")
    session_id = await create_session(node, "cat")
    auth = {"Authorization": f"Bearer {token('cat')}"}
    async with aiohttp.ClientSession() as http:
        for method, path in (
            ("POST", "/api/v1/sessions"),
            ("PATCH", f"/api/v1/sessions/{session_id}"),
            ("DELETE", f"/api/v1/sessions/{session_id}"),
            ("GET", f"/api/v1/sessions/{session_id}/messages"),
        ):
            async with http.options(f"{node.url}{path}", headers=preflight(method, APP)) as resp:
                assert resp.status == 204, (method, path, resp.status)
                assert resp.headers["Access-Control-Allow-Origin"] == APP
                assert resp.headers["Vary"] == "Origin"
                methods = {
                    m.strip() for m in resp.headers["Access-Control-Allow-Methods"].split(",")
                }
                assert methods == {"GET", "POST", "PATCH", "DELETE"}
                allowed = resp.headers["Access-Control-Allow-Headers"].lower()
                assert {h.strip() for h in allowed.split(",")} == {"authorization", "content-type"}
                assert "Access-Control-Allow-Credentials" not in resp.headers

        # Every answer to an allowed origin carries the grant: successes and errors alike.
        origin = {"Origin": APP}
        async with http.get(f"{node.url}/api/v1/sessions", headers={**auth, **origin}) as resp:
            assert resp.status == 200
            assert resp.headers["Access-Control-Allow-Origin"] == APP
        async with http.get(f"{node.url}/api/v1/sessions", headers=origin) as resp:
            assert resp.status == 401
            assert resp.headers["Access-Control-Allow-Origin"] == APP
        missing = f"{node.url}/api/v1/sessions/00000000-0000-0000-0000-000000000000"
        async with http.get(missing, headers={**auth, **origin}) as resp:
            assert resp.status == 404
            assert resp.headers["Access-Control-Allow-Origin"] == APP
        async with http.get(f"{node.url}/no/such/route", headers=origin) as resp:
            assert resp.status == 404
            assert resp.headers["Access-Control-Allow-Origin"] == APP

        # Another origin: no grant, the preflight refused.
        async with http.options(
            f"{node.url}/api/v1/sessions", headers=preflight("POST", OTHER)
        ) as resp:
            assert resp.status == 403
            assert "Access-Control-Allow-Origin" not in resp.headers
        async with http.get(
            f"{node.url}/api/v1/sessions", headers={**auth, "Origin": OTHER}
        ) as resp:
            assert "Access-Control-Allow-Origin" not in resp.headers

        # Not a browser (no Origin): nothing to grant, but a cache must tell them apart.
        async with http.get(f"{node.url}/api/v1/sessions", headers=auth) as resp:
            assert resp.status == 200
            assert "Access-Control-Allow-Origin" not in resp.headers
            assert resp.headers["Vary"] == "Origin"


async def test_any_origin_when_none_is_configured(cluster: Cluster) -> None:
    node = await cluster.node()
    async with aiohttp.ClientSession() as http:
        async with http.options(
            f"{node.url}/api/v1/sessions", headers=preflight("POST", OTHER)
        ) as resp:
            assert resp.status == 204
            assert resp.headers["Access-Control-Allow-Origin"] == "*"
        async with http.get(f"{node.url}/client/fanout.js", headers={"Origin": OTHER}) as resp:
            assert resp.status == 200
            assert resp.headers["Access-Control-Allow-Origin"] == "*"
