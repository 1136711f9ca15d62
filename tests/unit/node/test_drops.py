"""What a node counts as a dropped frame (SPEC §7: a counter that is not a fault is not
shown as one): only frames discarded at the send-queue bound; frames for a socket that
was closing anyway are `unsent`."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from node.ws.connection import Connection, ConnectionHooks
from node.ws.wire import Wire


class FakeTransport:
    def __init__(self, buffered: int) -> None:
        self.buffered = buffered
        self.closed = False

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


class FakeWire:
    """A socket whose kernel buffer already holds `buffered` bytes and never drains."""

    def __init__(self, buffered: int) -> None:
        self.transport = FakeTransport(buffered)
        self.written: list[bytes] = []

    def write_framed(self, frame: bytes) -> None:
        self.written.append(frame)

    def write_close(self, code: int, reason: str) -> None:
        self.written.append(b"close")

    async def wait_peer_closed(self) -> None:
        return None

    async def drain(self) -> None:
        await asyncio.Event().wait()  # never: the peer does not read


def _counted() -> tuple[ConnectionHooks, dict[str, int]]:
    counts = {"dropped": 0, "unsent": 0}

    def add(name: str) -> Any:
        return lambda n: counts.__setitem__(name, counts[name] + n)

    return ConnectionHooks(on_drop=add("dropped"), on_unsent=add("unsent")), counts


def _connection(hooks: ConnectionHooks, limit: int = 1024) -> Connection:
    return Connection(
        conn_id="c1",
        user_id="ann",
        device_id="d1",
        session_id=None,
        queue_limit=limit,
        hooks=hooks,
    )


async def test_frames_for_a_closing_socket_are_unsent_not_dropped() -> None:
    hooks, counts = _counted()
    conn = _connection(hooks)
    conn.attach(cast(Wire, FakeWire(buffered=0)))
    conn.close(1000, "bye")  # the client left
    conn.send_framed(b"x" * 10)
    await conn.send_paced(b"y" * 10)
    await asyncio.sleep(0)
    assert counts == {"dropped": 0, "unsent": 2}


async def test_frames_over_the_queue_bound_are_dropped() -> None:
    hooks, counts = _counted()
    conn = _connection(hooks, limit=1024)
    wire = FakeWire(buffered=1000)
    conn.attach(cast(Wire, wire))
    conn.send_framed(b"a" * 100)  # past the bound: dropped, the connection closes 1013
    await asyncio.sleep(0)
    assert counts == {"dropped": 1, "unsent": 0}
    assert wire.written == [b"close"]
    conn.send_framed(b"b" * 100)  # closing now: not written, and not a second fault
    assert counts == {"dropped": 1, "unsent": 1}
