"""Nothing lost: resume on any node, node death, rolling restarts, slow consumers (issue 3)."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from common.config import Settings
from common.localcluster.embedded import Services
from common.protocol import encode
from common.transport.bus import Bus
from tests.support.checker import Flow, check, devices
from tests.support.harness import Cluster, Proc, connect, create_session, is_type, token
from tests.support.proxy import CuttableProxy


async def test_reconnect_to_the_other_node_gets_exactly_the_missed(
    cluster: Cluster, settings: Settings
) -> None:
    node1, node2 = await asyncio.gather(cluster.node(), cluster.node())
    flow = Flow(settings, ["rita"])
    async with connect(node1, "rita", "r1") as first:
        await flow.run(rate=200, duration=0.1)
        frames = await first.drain()
        last = frames[-1]["seq"]
    await flow.run(rate=200, duration=0.2)  # missed while away
    missed = flow.published - last
    async with connect(node2, "rita", "r1", last_seq=str(last)) as again:
        replay = [await again.recv() for _ in range(missed)]
        assert [f["seq"] for f in replay] == list(range(last + 1, last + missed + 1))
        resumed = await again.recv()
        assert resumed == {
            "type": "resumed",
            "from": last + 1,
            "to": last + missed,
            "complete": True,
        }
        await flow.run(rate=50, duration=0.1)
        live = await again.until(lambda f: "seq" in f)
        assert live["seq"] == last + missed + 1, "live traffic follows without gap"


async def _flow_through_a_fault(cluster: Cluster, settings: Settings, fault: str) -> None:
    node1, node2 = await asyncio.gather(cluster.node(), cluster.node())
    users = [f"u{i}" for i in range(50)]
    urls = [node1.ws_url, node2.ws_url]
    async with devices(urls, users, per_user=2) as devs:
        flow = Flow(settings, users)
        running = asyncio.create_task(flow.run(rate=400, duration=4))
        await asyncio.sleep(1.0)
        victim = next(p for p in (node1, node2) if any(d.client.node_id == p.name for d in devs))
        moved = [d for d in devs if d.client.node_id == victim.name]
        if fault == "kill":
            victim.kill()
        else:
            assert victim.terminate(timeout=20) == 0, victim.log()
        await running
        report = await check(devs, settings)
        print(f"{fault}: {report} ({len(moved)} devices moved)")
        report.assert_clean()
        assert moved and all(d.client.stats.connects >= 2 for d in moved)
        if fault == "term":
            assert all(1001 in d.client.stats.closes for d in moved)


async def test_node_killed_under_load_loses_nothing(cluster: Cluster, settings: Settings) -> None:
    await _flow_through_a_fault(cluster, settings, "kill")


async def test_rolling_restart_sigterm_loses_nothing(cluster: Cluster, settings: Settings) -> None:
    await _flow_through_a_fault(cluster, settings, "term")


async def test_trimmed_log_resume_is_incomplete(cluster: Cluster, settings: Settings) -> None:
    node = await cluster.node(FANOUT_USER_LOG_MAXLEN="10")
    flow = Flow(
        settings.__class__.from_env({**_env(settings), "FANOUT_USER_LOG_MAXLEN": "10"}), ["sam"]
    )
    await flow.run(rate=500, duration=0.1)
    async with connect(node, "sam", "s1", last_seq="1") as sam:
        resumed = await sam.until(is_type("resumed"))
        assert resumed["complete"] is False
        assert resumed["to"] == flow.published
        replayed = [f["seq"] for f in sam.frames if "seq" in f]
        assert replayed == list(range(flow.published - 9, flow.published + 1))


SLOW_FRAMES = 3000


def _env(settings: Settings) -> dict[str, str]:
    return {
        "FANOUT_REDIS_URL": settings.redis_url,
        "FANOUT_NAMESPACE": settings.namespace,
        "FANOUT_DATABASE_URL": settings.database_url,
    }


@pytest.mark.parametrize("fault", ["cut", "freeze"])
async def test_redis_link_failure_under_load_heals_without_loss(
    cluster: Cluster, settings: Settings, services: Services, fault: str
) -> None:
    """`cut` drops the connections; `freeze` keeps them open but silent (only the
    loop-back probe can tell)."""
    parts = urlsplit(services.redis_url)
    async with CuttableProxy(parts.hostname or "127.0.0.1", parts.port or 6379) as proxy:
        via_proxy = f"redis://127.0.0.1:{proxy.port}{parts.path}"
        node = await cluster.node(FANOUT_REDIS_URL=via_proxy)
        users = [f"v{i}" for i in range(20)]
        async with devices([node.ws_url], users, per_user=2) as devs:
            flow = Flow(settings, users)  # publishes straight to Redis, not via the proxy
            running = asyncio.create_task(flow.run(rate=300, duration=7))
            await asyncio.sleep(0.8)
            proxy.cut() if fault == "cut" else proxy.freeze()
            # Deliveries published meanwhile are missed live; a freeze outlasts the probe.
            await asyncio.sleep(2.5 if fault == "cut" else 5.0)
            proxy.heal()
            proxy.thaw()
            await running
            report = await check(devs, settings, settle=20)
            print(f"redis {fault}: {report}")
            report.assert_clean()
        assert "pub/sub connection lost" in node.log()
        if fault == "freeze":
            assert "probe unanswered" in node.log()


async def test_slow_consumer_is_closed_1013_and_resumes(
    cluster: Cluster, settings: Settings
) -> None:
    node = await cluster.node(FANOUT_SEND_QUEUE_BYTES="65536", FANOUT_USER_LOG_MAXLEN="5000")
    flow = Flow(settings, ["slow"])
    # A raw socket that upgrades and then never reads: the kernel buffers fill, then
    # the node's queue, and the node must cut it rather than grow.
    reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
    writer.write(
        (
            f"GET /ws?device_id=stuck HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {token('slow')}\r\n\r\n"
        ).encode()
    )
    await writer.drain()
    rss_before = _rss(node)
    async with connect(node, "fast", "f1") as fast:
        body = "x" * 10000
        redis = aioredis.Redis.from_url(settings.redis_url)
        bus = Bus(redis, replace(settings, user_log_maxlen=SLOW_FRAMES))
        try:
            for i in range(SLOW_FRAMES):  # 30 MB: more than loopback buffers hold
                await bus.deliver(
                    ["slow"],
                    encode(
                        {"type": "notification", "title": str(i), "level": "info", "body": body}
                    )[1:],
                )
            await bus.deliver(
                ["fast"],
                encode({"type": "notification", "title": "hi", "level": "info", "body": "x"})[1:],
            )
            got = await fast.until(is_type("notification"), timeout=5)
            assert got["title"] == "hi", "other clients are not held up"
        finally:
            await redis.aclose()
        metrics = await _metrics(node)
        assert metrics.get("fanout_slow_consumer_closes_total", 0) >= 1, metrics
        grown = _rss(node) - rss_before
        print(f"slow consumer: node RSS grew {grown / 1e6:.1f} MB for 30 MB sent to it")
        assert grown < 15e6, "the node buffered what the slow client did not read"
    writer.transport.abort()
    del flow, reader
    async with connect(node, "slow", "stuck", last_seq="0") as back:
        resumed = await back.until(is_type("resumed"), timeout=15)
        seqs = [f["seq"] for f in back.frames if "seq" in f]
        assert seqs == list(range(1, SLOW_FRAMES + 1)) and resumed["complete"] is True


def _rss(proc: Proc) -> int:
    for line in Path(f"/proc/{proc.popen.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def _metrics(node: Proc) -> dict[str, float]:
    async with aiohttp.ClientSession() as http, http.get(f"{node.url}/metrics") as resp:
        text = await resp.text()
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}


async def test_incomplete_resume_is_filled_from_the_history_api(cluster: Cluster) -> None:
    """The log kept 5 frames; the device missed more, learns it, and pages the rest."""
    small_log = {"FANOUT_USER_LOG_MAXLEN": "5"}
    node = await cluster.node(**small_log)
    await cluster.worker(**small_log)
    session_id = await create_session(node, "tom", ["una"])
    async with connect(node, "tom", "t1") as tom:
        last = tom.welcome["last_seq"]
    missed: list[str] = []
    async with connect(node, "una", "u1") as una:
        for i in range(6):  # 6 chats + 6 replies (+ the session frame) > 5 logged
            missed.append(await una.chat(session_id, f"while tom is away {i}"))
            await una.until(
                is_type(
                    "message",
                    message__role="assistant",
                    message__content=f"You said: while tom is away {i}",
                )
            )
    async with connect(node, "tom", "t1", last_seq=str(last)) as tom:
        resumed = await tom.until(is_type("resumed"))
        assert resumed["complete"] is False
    # The client pages history over HTTP for what the log no longer held.
    seen: list[dict[str, object]] = []
    cursor: str | None = None
    async with aiohttp.ClientSession() as http:
        while True:
            params = {"limit": "4", **({"before": cursor} if cursor else {})}
            async with http.get(
                f"{node.url}/api/v1/sessions/{session_id}/messages",
                params=params,
                headers={"Authorization": f"Bearer {token('tom')}"},
            ) as resp:
                assert resp.status == 200, await resp.text()
                page = await resp.json()
            seen += page["items"]
            cursor = page["next"]
            if cursor is None:
                break
    users = [m["client_msg_id"] for m in reversed(seen) if m["role"] == "user"]
    assert users == missed
    assert sum(1 for m in seen if m["role"] == "assistant") == 6
