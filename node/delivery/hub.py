"""The node's local users: subscriptions, seq ordering, gap repair and fan-out to devices.

Every frame that arrives on a user channel is dispatched synchronously from the
pub/sub read callback. A logged frame (with seq) is written only if it is the next
seq this node owes the user; an older one is a duplicate and dropped; a newer one
means the node missed something, and the user is put in repair: the missing range
is read from the user's delivery log before anything newer is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator

from common.backoff import Backoff
from common.protocol import SKIP_MARK, encode, seq_of, unstamp
from common.transport.bus import Bus
from common.transport.keys import Keys
from common.transport.pubsub import ChannelSubscriber
from common.wsframe import text_frame
from node.ws.connection import Connection
from node.ws.timers import Heartbeat, TokenExpiry

log = logging.getLogger("fanout.node")

# Frames held per user while its seq stream is being synced or repaired. Past it the
# newest are dropped too: they are in the log and the repair reads them from there.
MAX_HELD = 1024
# Log entries read per round trip while replaying to a resuming connection.
REPLAY_BATCH = 256
# A gap repair that fails (Redis down) retries with back-off up to this cap, seconds.
REPAIR_RETRY_FIRST = 0.05
REPAIR_RETRY_CAP = 2.0


class LocalUser:
    """One user's connections on this node and the seq this node delivered up to."""

    __slots__ = ("connections", "held", "joining", "last_seq", "ready", "repair", "user_id")

    def __init__(self, user_id: str, ready: asyncio.Future[None]) -> None:
        self.user_id = user_id
        self.connections: list[Connection] = []
        # None until the subscription is live and the starting seq is known.
        self.last_seq: int | None = None
        self.held: list[tuple[int, bytes]] = []
        self.ready = ready
        self.repair: asyncio.Task[None] | None = None
        # Connections between "user found" and "appended": they keep the user subscribed.
        self.joining = 0

    def write(self, seq: int, frame: bytes) -> None:
        framed = text_frame(frame)  # once for all the user's devices
        for conn in self.connections:
            if seq > conn.floor:
                conn.send_framed(framed)


class Hub:
    """Local users by id, fed by a Subscriber in `user` or `pattern` mode."""

    def __init__(self, bus: Bus, keys: Keys, *, mode: str) -> None:
        self._bus = bus
        self._keys = keys
        self._mode = mode
        self.users: dict[str, LocalUser] = {}
        # Bumped whenever `users` or a user's connections change, and the connections in
        # all: the stats writer skips its per-connection walks while nothing changed.
        self.changes = 0
        self.connection_count = 0
        self.subscriber: ChannelSubscriber | None = None
        self.on_delivered: Callable[[int], None] = lambda count: None
        # Seconds from a logged frame's publication (Redis' clock) to its hand-over to the
        # sockets, for the delivery latency histogram (SPEC §7).
        self.on_latency: Callable[[float], None] = lambda seconds: None
        # Redis' clock minus ours (node/stats.py measures it): publication stamps are Redis'.
        self.clock_offset = 0.0
        self.gaps_repaired = 0
        self.expiry = TokenExpiry()
        self.heartbeat = Heartbeat()

    def attach(self, subscriber: ChannelSubscriber) -> None:
        self.subscriber = subscriber

    def connections(self) -> Iterator[Connection]:
        for user in self.users.values():
            yield from user.connections

    # -- membership -----------------------------------------------------------------------
    async def join(
        self, conn: Connection, greet: Callable[[int], None], resume_from: int | None = None
    ) -> None:
        """Add a connection once the user's channel is live.

        `greet(newest_seq)` queues the welcome. A resuming connection then gets every
        logged frame after `resume_from` and a `resumed` frame, before any live one.
        """
        user = self.users.get(conn.user_id)
        if user is None:
            user = LocalUser(conn.user_id, asyncio.get_running_loop().create_future())
            self.users[conn.user_id] = user
            self.changes += 1
            try:
                await self._start(user)
            except BaseException as exc:
                # Roll back so the next join tries again (and waiting joiners fail too).
                if self.users.get(conn.user_id) is user:
                    del self.users[conn.user_id]
                    self.changes += 1
                    self._unsubscribe(user)
                user.ready.set_exception(exc)
                user.ready.exception()  # mark retrieved: there may be no other joiner
                raise
            user.ready.set_result(None)
        user.joining += 1
        try:
            await asyncio.shield(user.ready)
            newest = await self._bus.current_seq(conn.user_id)
            assert user.last_seq is not None
            greet(max(newest, user.last_seq))
            if resume_from is None:
                conn.floor = max(newest, user.last_seq)
            else:
                await self._replay(user, conn, resume_from, newest)
            user.connections.append(conn)
            self.changes += 1
            self.connection_count += 1
        finally:
            user.joining -= 1
            self._forget_if_idle(user)

    async def _replay(self, user: LocalUser, conn: Connection, after: int, newest: int) -> None:
        """Send every logged frame after `after`, paced by the socket, then `resumed`."""
        first: int | None = None
        replayed_to = after
        # Loop: frames this node delivered during the replay must be replayed too.
        while replayed_to < max(newest, user.last_seq or 0):
            batch = await self._bus.log_after(conn.user_id, replayed_to, REPLAY_BATCH)
            if not batch:
                break  # gone from the log (trimmed or expired)
            for frame in batch:
                await conn.send_paced(frame)
            first = first or seq_of(batch[0])
            replayed_to = seq_of(batch[-1]) or replayed_to
        conn.floor = max(newest, user.last_seq or 0, replayed_to)
        complete = first == after + 1 if first is not None else after == conn.floor
        conn.send(
            encode({"type": "resumed", "from": after + 1, "to": replayed_to, "complete": complete})
        )

    async def _start(self, user: LocalUser) -> None:
        if self._mode == "user":
            assert self.subscriber is not None
            await self.subscriber.subscribe([self._keys.user_channel(user.user_id).encode()])
        start = await self._bus.current_seq(user.user_id)
        user.last_seq = start
        held, user.held = user.held, []
        for seq, frame in sorted(held):
            self._offer(user, seq, frame)

    def leave(self, conn: Connection) -> None:
        user = self.users.get(conn.user_id)
        if user is None or conn not in user.connections:
            return
        user.connections.remove(conn)
        self.changes += 1
        self.connection_count -= 1
        self._forget_if_idle(user)

    def _forget_if_idle(self, user: LocalUser) -> None:
        """The last local connection is gone: drop the user and its subscription."""
        if user.connections or user.joining or not user.ready.done():
            return
        if self.users.get(user.user_id) is user:
            del self.users[user.user_id]
            self.changes += 1
            if user.repair is not None:
                user.repair.cancel()
            self._unsubscribe(user)

    def _unsubscribe(self, user: LocalUser) -> None:
        if self._mode == "user" and self.subscriber is not None:
            self.subscriber.unsubscribe([self._keys.user_channel(user.user_id).encode()])

    # -- delivery -------------------------------------------------------------------------
    def on_message(self, channel: bytes, data: bytes) -> None:
        """Pub/sub callback: route one published frame to the user's local devices."""
        user = self.users.get(self._keys.user_from_channel(channel))
        if user is None:
            return  # pattern mode: a user this node does not hold
        if data[:1] == SKIP_MARK:
            device, _, frame = data[1:].partition(b"\n")
            self._send_ephemeral(user, frame, skip=device.decode())
            return
        published, data = unstamp(data)
        seq = seq_of(data)
        if seq is None:
            self._send_ephemeral(user, data)
            return
        if self._offer(user, seq, data) and published is not None:
            self.on_latency(time.time() + self.clock_offset - published)

    def _send_ephemeral(self, user: LocalUser, frame: bytes, skip: str | None = None) -> None:
        """A frame without a seq to every local device of the user (but `skip`'s)."""
        framed = text_frame(frame)
        for conn in user.connections:
            if conn.device_id != skip:
                conn.send_framed(framed)
        self.on_delivered(len(user.connections))

    def _offer(self, user: LocalUser, seq: int, frame: bytes) -> bool:
        """True if the frame went to the sockets now (not held back, not a duplicate)."""
        last = user.last_seq
        if last is None or user.repair is not None:
            if len(user.held) < MAX_HELD:
                user.held.append((seq, frame))
            return False
        if seq <= last:
            return False  # already delivered
        if seq == last + 1:
            user.last_seq = seq
            user.write(seq, frame)
            self.on_delivered(len(user.connections))
            return True
        user.held.append((seq, frame))
        user.repair = asyncio.create_task(self._repair(user), name=f"repair-{user.user_id}")
        return False

    async def _repair(self, user: LocalUser) -> None:
        """Fill a seq gap from the delivery log, then release the held frames in order."""
        backoff = Backoff(first=REPAIR_RETRY_FIRST, cap=REPAIR_RETRY_CAP)
        while True:
            try:
                assert user.last_seq is not None
                missing = await self._bus.log_after(user.user_id, user.last_seq)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down: keep the user held and retry
                log.warning("gap repair for %s failed (%s); retrying", user.user_id, exc)
                await asyncio.sleep(backoff.next_delay())
        self.gaps_repaired += 1
        frames = [(seq_of(f) or 0, f) for f in missing]
        held, user.held = user.held, []
        user.repair = None
        for seq, frame in sorted([*frames, *held]):
            if user.last_seq is not None and seq > user.last_seq + 1:
                # The log no longer has the missing range (trimmed or expired): skip it.
                log.warning(
                    "user %s: seqs %d..%d are gone from the log",
                    user.user_id,
                    user.last_seq + 1,
                    seq - 1,
                )
                user.last_seq = seq - 1
            self._offer(user, seq, frame)

    def repair_all(self) -> None:
        """After a pub/sub reconnect: anything may have been missed, check every user."""
        for user in self.users.values():
            if user.last_seq is None:
                continue  # still joining: it reads the newest seq after its channel is live
            if user.repair is not None:
                # A repair in flight may have read the log before the drop, and would
                # miss what was published during it: read again. Cancelling is safe,
                # it changes nothing before its read returns.
                user.repair.cancel()
            user.repair = asyncio.create_task(self._repair(user), name=f"repair-{user.user_id}")

    async def close(self) -> None:
        self.expiry.close()
        self.heartbeat.close()
        tasks = [u.repair for u in self.users.values() if u.repair is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
