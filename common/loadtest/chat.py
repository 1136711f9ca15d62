"""`fanout loadtest --mode chat`: devices send chats, workers persist them and reply.

Every user owns one session (created over HTTP, agent `ai`). Chats go round-robin
over users, each from the next of the user's devices, at `--rate` chats per second
(0: as fast as `--window` chats awaiting their reply allow). For each chat the run
measures send -> `ack` on the sending device, send -> the stored `message` on every
device of the user, and send -> the assistant's reply on every device of the user.
The chat id is in the content, and the built-in assistant answers "You said: <content>",
so a reply names the chat it answers. Lost = echo and reply frames an acked chat
still owes some device after the settle period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from common.loadtest.fleet import Device, Fleet, LoadConfig, Tally, monotonic_us
from common.loadtest.report import LatencyHistogram, Report

log = logging.getLogger("fanout.loadtest")

# Sessions created at once over HTTP before the run.
SESSION_CONCURRENCY = 50
# Chats awaiting their reply at once when --rate is 0 and no --window is given.
CHAT_WINDOW = 200
# Chats per second of the warm-up (one per session) when --rate is 0.
WARM_UP_RATE = 200.0


@dataclass(slots=True)
class Chat:
    user: str
    sent_us: int
    acked: bool = False
    echoes: int = 0
    replies: int = 0


class ChatDriver:
    """Sends the chats and matches acks, echoes and replies to them."""

    def __init__(self, config: LoadConfig, fleet: Fleet, tally: Tally) -> None:
        self.config = config
        self.fleet = fleet
        self.tally = tally
        self.sessions: dict[str, str] = {}
        self.chats: dict[str, Chat] = {}
        self.devices_of: dict[str, int] = {}
        self.ack = LatencyHistogram()
        self.echo_all = LatencyHistogram()
        self.reply_all = LatencyHistogram()
        self.replied = 0
        self.sent = 0
        self.window_s = 0.0
        self.first_sent_us = 0
        self.last_reply_us = 0
        self.senders: list[tuple[str, list[Device]]] = []
        self.warm_up: dict[str, Any] = {}

    def handlers(self, device: Device) -> dict[str, Any]:
        def on_frame(frame: dict[str, Any]) -> None:
            self._on_frame(device, frame)

        return {"on_frame": on_frame}

    def _on_frame(self, device: Device, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        now = monotonic_us()
        if kind == "message":
            message = frame["message"]
            if message["role"] == "assistant":
                chat_id = message["content"].split(" ", 3)[2]
            else:
                chat_id = message.get("client_msg_id") or ""
            chat = self.chats.get(chat_id)
            if chat is None:
                return
            self.tally.delivered += 1
            if "seq" in frame:
                device.received.add(frame["seq"])
            if message["role"] == "assistant":
                chat.replies += 1
                if chat.replies == self.devices_of[chat.user]:
                    self.reply_all.record(now - chat.sent_us)
                    self.replied += 1
                    self.last_reply_us = now
            else:
                chat.echoes += 1
                self.tally.latency.record(now - chat.sent_us)
                if chat.echoes == self.devices_of[chat.user]:
                    self.echo_all.record(now - chat.sent_us)
        elif kind == "ack":
            chat = self.chats.get(frame.get("id") or "")
            if chat is not None and not chat.acked:
                chat.acked = True
                self.ack.record(now - chat.sent_us)
        elif kind == "error":
            self.tally.error(f"error_frame:{frame.get('code')}")

    async def _create_sessions(self) -> None:
        assert self.fleet.http is not None
        http, urls = self.fleet.http, self.config.urls
        gate = asyncio.Semaphore(SESSION_CONCURRENCY)

        async def one(i: int, user: str) -> None:
            base = _http_base(urls[i % len(urls)])
            async with (
                gate,
                http.post(
                    f"{base}/api/v1/sessions",
                    json={"participants": []},
                    headers={"Authorization": f"Bearer {self.fleet.tokens[user]}"},
                ) as resp,
            ):
                if resp.status != 201:
                    self.tally.error(f"session_http_{resp.status}")
                    return
                self.sessions[user] = (await resp.json())["id"]

        await asyncio.gather(*(one(i, u) for i, u in enumerate(self.fleet.users)))

    async def delete_sessions(self) -> None:
        """Delete the run's sessions (and their messages) over HTTP, as their owners."""
        assert self.fleet.http is not None
        http, base = self.fleet.http, _http_base(self.config.urls[0])
        gate = asyncio.Semaphore(SESSION_CONCURRENCY)

        async def one(user: str, session_id: str) -> None:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with (
                    gate,
                    http.delete(
                        f"{base}/api/v1/sessions/{session_id}",
                        headers={"Authorization": f"Bearer {self.fleet.tokens[user]}"},
                    ),
                ):
                    pass

        await asyncio.gather(*(one(u, s) for u, s in self.sessions.items()))

    async def prepare(self) -> None:
        """Sessions over HTTP, then a warm-up chat in each (all before the measured window).

        A session's first message also starts it (pending -> running, announced to its
        devices) and meets cold caches: that is a one-off cost per session, measured
        apart from the steady state (`warm_up` in the report).
        """
        await self._create_sessions()
        by_user: dict[str, list[Device]] = {}
        for device in self.fleet.connected:
            by_user.setdefault(device.user, []).append(device)
        self.senders = [(u, ds) for u, ds in by_user.items() if u in self.sessions]
        self.devices_of = {u: len(ds) for u, ds in by_user.items()}
        if not self.senders:
            return
        started = time.monotonic()
        await self._send(self.config.rate or WARM_UP_RATE, len(self.senders), "w")
        await self.settle()
        self.warm_up = {
            "chats": self.sent,
            "replied_on_all_devices": self.replied,
            "seconds": round(time.monotonic() - started, 2),
            "reply_ms": self.reply_all.summary_ms(),
        }
        self.chats.clear()
        self.sent = self.replied = 0
        self.ack, self.echo_all, self.reply_all = (LatencyHistogram() for _ in range(3))
        self.tally.latency = LatencyHistogram()
        self.tally.delivered = 0

    async def run(self, report: Report) -> None:
        """Chat for `duration` seconds."""
        if not self.senders:
            self.tally.error("no_senders")
            return
        started = time.monotonic()
        self.first_sent_us = monotonic_us()
        await self._send(self.config.rate, None, "c")
        self.window_s = time.monotonic() - started

    async def _send(self, rate: float, count: int | None, prefix: str) -> None:
        """Chats round-robin over the users, at `rate` (0: `window` awaiting replies), for
        `count` chats or else `duration` seconds."""
        cfg = self.config
        pad = "x" * cfg.payload
        window = cfg.window or CHAT_WINDOW
        started = time.monotonic()
        deadline = started + (cfg.duration if count is None else cfg.connect_timeout)
        while (now := time.monotonic()) < deadline and (count is None or self.sent < count):
            if rate > 0:
                due = int((now - started) * rate) - self.sent
                if due <= 0:
                    await asyncio.sleep(max(0.0005, (self.sent + 1) / rate - (now - started)))
                    continue
            elif self.sent - self.replied >= window:
                await asyncio.sleep(0.0005)
                continue
            user, devices = self.senders[self.sent % len(self.senders)]
            device = devices[(self.sent // len(self.senders)) % len(devices)]
            chat_id = f"{prefix}{self.sent}"
            self.sent += 1
            self.chats[chat_id] = Chat(user, monotonic_us())
            assert device.client is not None
            frame = {
                "type": "chat",
                "id": chat_id,
                "session_id": self.sessions[user],
                "content": f"{chat_id} {pad}",
            }
            try:
                await device.client.send(frame)
            except (ConnectionError, TimeoutError, RuntimeError) as exc:
                self.tally.error("send")
                log.debug("chat %s not sent: %s", chat_id, exc)

    async def settle(self) -> None:
        """Wait until every acked chat was replied on all devices, or `settle` seconds."""
        deadline = time.monotonic() + self.config.settle
        while time.monotonic() < deadline:
            if all(
                c.replies >= self.devices_of[c.user] and c.echoes >= self.devices_of[c.user]
                for c in self.chats.values()
                if c.acked
            ):
                return
            await asyncio.sleep(0.05)

    def account(self, report: Report) -> None:
        acked = [c for c in self.chats.values() if c.acked]
        report.published = len(acked)
        report.expected = sum(2 * self.devices_of[c.user] for c in acked)
        report.lost = sum(
            max(0, self.devices_of[c.user] - c.echoes) + max(0, self.devices_of[c.user] - c.replies)
            for c in acked
        )
        report.duplicated = sum(d.duplicated for d in self.fleet.connected)
        report.out_of_order = sum(d.out_of_order for d in self.fleet.connected)
        report.gaps = sum(d.client.stats.gaps for d in self.fleet.connected if d.client)
        unacked = self.sent - len(acked)
        if unacked:
            self.tally.error("unacked", unacked)
        report.chat = {
            "sent": self.sent,
            "acked": len(acked),
            "replied_on_all_devices": self.replied,
            "chats_per_s": round(self.sent / self.window_s, 1) if self.window_s else 0.0,
            # Completed (replied on every device) per second, first send to last reply:
            # below chats_per_s when the workers fell behind and drained in the settle time.
            "replied_per_s": round(
                self.replied / (self.last_reply_us - self.first_sent_us) * 1e6, 1
            )
            if self.last_reply_us > self.first_sent_us
            else 0.0,
            "ack_ms": self.ack.summary_ms(),
            "message_on_all_devices_ms": self.echo_all.summary_ms(),
            "reply_ms": self.reply_all.summary_ms(),
            "warm_up": self.warm_up,
        }


def _http_base(ws_url: str) -> str:
    """http(s)://host:port of a node from its WebSocket URL."""
    return ws_url.replace("ws", "http", 1).rsplit("/ws", 1)[0]
