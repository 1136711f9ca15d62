"""The node's per-user seq logic: in order, no duplicates, gaps repaired from the log."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from common.transport.keys import Keys
from node.delivery.hub import Hub

KEYS = Keys("")


class MemoryLog:
    """The two bus reads the hub makes, over an in-memory delivery log."""

    def __init__(self) -> None:
        self.frames: dict[str, list[bytes]] = {}
        self.trimmed_below = 0

    def append(self, user: str) -> bytes:
        log = self.frames.setdefault(user, [])
        frame = b'{"seq":%d,"type":"message","n":%d}' % (len(log) + 1, len(log) + 1)
        log.append(frame)
        return frame

    async def current_seq(self, user: str) -> int:
        return len(self.frames.get(user, []))

    async def log_after(self, user: str, after: int, limit: int | None = None) -> list[bytes]:
        start = max(after, self.trimmed_below)
        return self.frames.get(user, [])[start : None if limit is None else start + limit]


class FakeConn:
    def __init__(self, user: str, device: str) -> None:
        self.user_id, self.device_id = user, device
        self.floor = 0
        self.sent: list[dict[str, Any]] = []
        self.framed: list[bytes] = []

    def send(self, frame: bytes) -> None:
        self.sent.append(orjson.loads(frame))

    def send_framed(self, framed: bytes) -> None:
        # A server text frame under 64 KiB: 2 header bytes, or 4 with a 16-bit length.
        assert framed[0] == 0x81, "one final text frame"
        self.framed.append(framed)
        self.send(framed[2:] if framed[1] < 126 else framed[4:])

    async def send_paced(self, frame: bytes) -> None:
        self.send(frame)

    def seqs(self) -> list[int]:
        return [f["seq"] for f in self.sent if "seq" in f]


async def _join(hub: Hub, conn: FakeConn, resume_from: int | None = None) -> None:
    await hub.join(
        conn,
        lambda newest: conn.send(orjson.dumps({"type": "welcome", "last_seq": newest})),
        resume_from,
    )  # type: ignore[arg-type]


def _publish(hub: Hub, user: str, frame: bytes) -> None:
    hub.on_message(KEYS.user_channel(user).encode(), frame)


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_in_order_and_duplicates_dropped() -> None:
    log = MemoryLog()
    hub = Hub(log, KEYS, mode="pattern")  # type: ignore[arg-type]
    a, b = FakeConn("u", "a"), FakeConn("u", "b")
    await _join(hub, a)
    await _join(hub, b)
    frames = [log.append("u") for _ in range(3)]
    for frame in [frames[0], frames[1], frames[1], frames[0], frames[2]]:
        _publish(hub, "u", frame)
    assert a.seqs() == b.seqs() == [1, 2, 3]


async def test_gap_is_filled_from_the_log_before_newer_frames() -> None:
    log = MemoryLog()
    hub = Hub(log, KEYS, mode="pattern")  # type: ignore[arg-type]
    conn = FakeConn("u", "a")
    await _join(hub, conn)
    frames = [log.append("u") for _ in range(6)]
    _publish(hub, "u", frames[0])
    _publish(hub, "u", frames[4])  # 2..4 were lost on the way
    _publish(hub, "u", frames[5])
    await _settle()
    assert conn.seqs() == [1, 2, 3, 4, 5, 6]
    assert hub.gaps_repaired == 1


async def test_gap_gone_from_the_log_is_skipped_not_stuck() -> None:
    log = MemoryLog()
    hub = Hub(log, KEYS, mode="pattern")  # type: ignore[arg-type]
    conn = FakeConn("u", "a")
    await _join(hub, conn)
    frames = [log.append("u") for _ in range(5)]
    log.trimmed_below = 3
    _publish(hub, "u", frames[4])
    await _settle()
    assert conn.seqs() == [4, 5]


async def test_resume_replays_then_resumed_then_live() -> None:
    log = MemoryLog()
    frames = [log.append("u") for _ in range(4)]
    hub = Hub(log, KEYS, mode="pattern")  # type: ignore[arg-type]
    conn = FakeConn("u", "a")
    await _join(hub, conn, resume_from=1)
    _publish(hub, "u", frames[3])  # already replayed: not twice
    _publish(hub, "u", log.append("u"))
    kinds = [f["type"] for f in conn.sent]
    assert kinds == ["welcome", "message", "message", "message", "resumed", "message"]
    assert conn.seqs() == [2, 3, 4, 5]
    assert conn.sent[4] == {"type": "resumed", "from": 2, "to": 4, "complete": True}


async def test_resume_past_a_trimmed_log_is_incomplete() -> None:
    log = MemoryLog()
    for _ in range(5):
        log.append("u")
    log.trimmed_below = 3
    hub = Hub(log, KEYS, mode="pattern")  # type: ignore[arg-type]
    conn = FakeConn("u", "a")
    await _join(hub, conn, resume_from=1)
    resumed = next(f for f in conn.sent if f["type"] == "resumed")
    assert resumed == {"type": "resumed", "from": 2, "to": 5, "complete": False}


async def test_skip_marker_spares_the_sending_device() -> None:
    hub = Hub(MemoryLog(), KEYS, mode="pattern")  # type: ignore[arg-type]
    a, b = FakeConn("u", "a"), FakeConn("u", "b")
    await _join(hub, a)
    await _join(hub, b)
    _publish(hub, "u", b'!a\n{"type":"typing"}')
    assert [f["type"] for f in a.sent] == ["welcome"]
    assert [f["type"] for f in b.sent] == ["welcome", "typing"]


class GatedLog(MemoryLog):
    """Reads the log when asked, answers when the gate opens (a slow Redis reply)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.gate.set()

    async def log_after(self, user: str, after: int, limit: int | None = None) -> list[bytes]:
        read = await super().log_after(user, after, limit)
        await self.gate.wait()
        return read


async def test_a_resubscribe_during_a_repair_reads_the_log_again() -> None:
    log = GatedLog()
    hub = Hub(log, KEYS, mode="pattern")  # type: ignore[arg-type]
    conn = FakeConn("u", "a")
    await _join(hub, conn)
    _publish(hub, "u", log.append("u"))
    log.gate.clear()
    log.append("u")  # seq 2: missed
    _publish(hub, "u", log.append("u"))  # seq 3: a gap, the repair reads the log (1..3)
    await _settle()
    log.append("u")  # seq 4: published while the pub/sub connection was down
    hub.repair_all()  # resubscribed
    log.gate.set()
    await _settle()
    assert conn.seqs() == [1, 2, 3, 4]


async def test_a_delivery_is_framed_once_for_all_devices() -> None:
    log = MemoryLog()
    hub = Hub(log, KEYS, mode="pattern")  # type: ignore[arg-type]
    a, b = FakeConn("u", "a"), FakeConn("u", "b")
    await _join(hub, a)
    await _join(hub, b)
    _publish(hub, "u", log.append("u"))
    _publish(hub, "u", b'{"type":"typing","user_id":"v"}')
    assert len(a.framed) == len(b.framed) == 2
    assert all(x is y for x, y in zip(a.framed, b.framed, strict=True)), "the same bytes"


async def test_joins_and_leaves_are_counted_and_change_the_hub() -> None:
    # The stats writer trusts `changes` to skip its walks (node/stats.py), and reports
    # `connection_count` as the node's connections.
    hub = Hub(MemoryLog(), KEYS, mode="pattern")  # type: ignore[arg-type]
    seen = hub.changes
    a1, a2, b1 = FakeConn("a", "1"), FakeConn("a", "2"), FakeConn("b", "1")
    for conn in (a1, a2, b1):
        await _join(hub, conn)
        assert hub.changes > seen
        seen = hub.changes
    assert hub.connection_count == 3 == len(list(hub.connections()))
    hub.leave(a2)  # type: ignore[arg-type]
    assert hub.changes > seen and hub.connection_count == 2 and set(hub.users) == {"a", "b"}
    seen = hub.changes
    hub.leave(a2)  # type: ignore[arg-type]  # not there any more: nothing changes
    assert hub.changes == seen and hub.connection_count == 2
    hub.leave(b1)  # type: ignore[arg-type]
    assert hub.changes > seen and hub.connection_count == 1 and set(hub.users) == {"a"}
