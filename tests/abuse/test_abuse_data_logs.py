"""Client strings cannot forge log lines (issue 13, SPEC §3 FANOUT_LOG_FORMAT): text logs
escape them, json logs are one object per line."""

from __future__ import annotations

from urllib.parse import quote

import aiohttp
import orjson

from tests.support.harness import Cluster, Proc, token

FORGED = "2026-12-03 00:00:00,000 ERROR fanout.node: forged"
ADMIN = f"root\n{FORGED}"
VICTIM = f"vic\r\n{FORGED}"


async def _log_two_client_strings(node: Proc) -> None:
    """An admin whose `sub` and a user id in the path both carry a forged line."""
    headers = {"Authorization": f"Bearer {token(ADMIN, roles=['admin'])}"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{node.url}/admin/users/{quote(VICTIM, safe='')}/disconnect", headers=headers
        ) as resp,
    ):
        assert resp.status == 200, await resp.text()


async def test_text_logs_escape_client_strings(cluster: Cluster) -> None:
    node = await cluster.node()
    await _log_two_client_strings(node)
    node.terminate()
    lines = node.log().splitlines()
    assert not any(line.startswith(FORGED) for line in lines)
    [line] = [line for line in lines if "disconnected user" in line]
    assert "root\\n2026-12-03" in line and "vic\\r\\n2026-12-03" in line


async def test_json_logs_are_one_object_per_line(cluster: Cluster) -> None:
    node = await cluster.node(FANOUT_LOG_FORMAT="json")
    await _log_two_client_strings(node)
    node.terminate()
    entries = [orjson.loads(line) for line in node.log().splitlines() if line.strip()]
    assert entries and all({"time", "level", "logger", "message"} <= set(e) for e in entries)
    [entry] = [e for e in entries if "disconnected user" in e["message"]]
    assert entry["message"].startswith(f"admin {ADMIN} disconnected user {VICTIM}")
    assert not any(e["message"].startswith(FORGED) for e in entries)
