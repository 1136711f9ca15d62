"""One chat entry, end to end: persist, fan out, and answer (SPEC §2, §5).

Every step is idempotent so an entry processed twice (a worker died before its
XACK) stores one row and gives each user one seq per message: the insert is keyed
by (session, sender, client id) and each delivery by the message id.
"""

from __future__ import annotations

import logging

from common.bus import Bus
from common.entries import ChatEntry
from common.lifecycle import takes_assistant_reply
from common.protocol import encode
from common.sessions import SessionChanges, SessionDirectory
from common.store import MessageRecord, SessionRecord, Store
from worker.assistant import ReplyGenerator

log = logging.getLogger("fanout.worker")

ASSISTANT_ID = "assistant"


def _message_body(message: MessageRecord) -> bytes:
    # Logged frames travel without their leading "{": the delivery script adds the seq.
    return encode(
        {"type": "message", "session_id": message.session_id, "message": message.to_json()}
    )[1:]


class ChatProcessor:
    """Handles the chat entries of the partitions a worker owns."""

    def __init__(
        self, store: Store, bus: Bus, sessions: SessionDirectory, assistant: ReplyGenerator
    ) -> None:
        self._store = store
        self._bus = bus
        self._changes = SessionChanges(store, bus, sessions)
        self._assistant = assistant
        self.processed = 0

    async def handle(self, entry: ChatEntry) -> None:
        """Process one entry; raises on failure (the entry then stays pending)."""
        async with self._store.conversation(entry.session_id) as conv:
            session = await conv.lock()
            if session is None:
                log.info(
                    "session %s is gone; dropping message %s", entry.session_id, entry.client_msg_id
                )
                return
            role = conv.participant_role(entry.user_id) or "user"
            message, created = await conv.insert_message(
                client_msg_id=entry.client_msg_id,
                role=role,
                user_id=entry.user_id,
                device_id=entry.device_id,
                content=entry.content,
                metadata=entry.metadata,
            )
            current = await conv.record_activity(session) if created else session
        await self._bus.deliver(
            current.participants, _message_body(message), delivery_key=f"m{message.id}"
        )
        if current.version != session.version:
            # pending -> running. Deferred, not raised, if Redis fails here: the entry
            # is stored and acked below, and the sweeper announces the change.
            await self._changes.announce_soon(current.id)
        if takes_assistant_reply(current.status, current.agent, role):
            await self._answer(current, message, first_time=created)
        self.processed += 1

    async def _answer(
        self, session: SessionRecord, message: MessageRecord, *, first_time: bool
    ) -> None:
        reply_key = f"reply:{message.id}"
        # A message stored just now cannot have a reply yet; a re-processed one may.
        reply = (
            None
            if first_time
            else await self._store.find_message(session.id, ASSISTANT_ID, reply_key)
        )
        if reply is None:
            reply_id = await self._store.next_message_id()
            parts: list[str] = []
            async for chunk in self._assistant.reply(session, message):
                parts.append(chunk)
                delta = encode(
                    {
                        "type": "message_delta",
                        "session_id": session.id,
                        "message_id": reply_id,
                        "delta": chunk,
                    }
                )
                await self._bus.publish(session.participants, delta)
            reply, _ = await self._store.insert_message(
                session.id,
                client_msg_id=reply_key,
                role="assistant",
                user_id=ASSISTANT_ID,
                device_id=None,
                content="".join(parts),
                metadata=None,
                message_id=reply_id,
            )
        await self._bus.deliver(
            session.participants, _message_body(reply), delivery_key=f"m{reply.id}"
        )
