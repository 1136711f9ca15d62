"""One chat entry, end to end: persist, fan out, and answer (SPEC §2, §5).

Every step is idempotent so an entry processed twice (a worker died before its
XACK) stores one row and gives each user one seq per message: the insert is keyed
by (session, sender, client id) and each delivery by the message id. Writes go
through the BatchWriter, which shares one transaction among the conversations
that are ready at the same time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

from common.protocol import encode
from common.store.batch import ReplyWrite
from common.store.lifecycle import takes_assistant_reply
from common.store.postgres import MessageRecord, SessionRecord, Store
from common.store.sessions import SessionChanges, SessionDirectory
from common.transport.bus import Bus
from common.transport.entries import ChatEntry
from worker.assistant.base import ReplyGenerator
from worker.writer import BatchWriter

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
        self,
        store: Store,
        bus: Bus,
        sessions: SessionDirectory,
        assistant: ReplyGenerator,
        writer: BatchWriter | None = None,
    ) -> None:
        self._store = store
        self._bus = bus
        self._changes = SessionChanges(store, bus, sessions)
        self._assistant = assistant
        self.writer = writer or BatchWriter(store)
        self.processed = 0

    async def handle(self, entry: ChatEntry) -> None:
        """Process one entry; raises on failure (the entry then stays pending)."""
        written = await self.writer.chat(entry)
        if written is None:
            log.info(
                "session %s is gone; dropping message %s", entry.session_id, entry.client_msg_id
            )
            return
        session, message = written.session, written.message
        await self._bus.deliver(
            session.participants, _message_body(message), delivery_key=f"m{message.id}"
        )
        if session.version != written.before.version:
            # pending -> running. Deferred, not raised, if Redis fails here: the entry
            # is stored and acked below, and the sweeper announces the change.
            await self._changes.announce_soon(session.id)
        if written.reply_id is not None:
            await self._answer(session, message, written.reply_id)
        elif not written.created and takes_assistant_reply(
            session.status, session.agent, written.role
        ):
            await self._answer_again(session, message)
        self.processed += 1

    async def _answer(self, session: SessionRecord, message: MessageRecord, reply_id: int) -> None:
        """Stream a reply under `reply_id`, store it, then deliver it as a message."""
        parts: list[str] = []
        # Deltas are not awaited one by one: each goes out as soon as it is made, in
        # order (one connection), and their outcome is checked before the final
        # message, which therefore always follows them.
        published: list[Awaitable[None]] = []
        try:
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
                if self._bus.pipelined:
                    published.append(self._bus.publish_soon(session.participants, delta))
                else:  # pooled connections keep no order between calls: one at a time
                    await self._bus.publish(session.participants, delta)
            reply = await self.writer.reply(
                ReplyWrite(
                    session_id=session.id,
                    message_id=reply_id,
                    client_msg_id=_reply_key(message),
                    user_id=ASSISTANT_ID,
                    content="".join(parts),
                )
            )
        finally:
            outcomes = await asyncio.gather(*published, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        await self._deliver_reply(session, reply)

    async def _answer_again(self, session: SessionRecord, message: MessageRecord) -> None:
        """A re-processed message (its worker died): deliver its reply, made if missing."""
        reply = await self._store.find_message(session.id, ASSISTANT_ID, _reply_key(message))
        if reply is None:
            await self._answer(session, message, await self._store.next_message_id())
            return
        await self._deliver_reply(session, reply)

    async def _deliver_reply(self, session: SessionRecord, reply: MessageRecord) -> None:
        # Keyed by the reply's id: a re-delivery after a crash keeps the first seq.
        await self._bus.deliver(
            session.participants, _message_body(reply), delivery_key=f"m{reply.id}"
        )


def _reply_key(message: MessageRecord) -> str:
    return f"reply:{message.id}"
