"""One chat entry, end to end: persist, fan out, and answer (SPEC §2, §5).

Every step is idempotent so an entry processed twice (a worker died before its
XACK) stores one row and gives each user one seq per message: the insert is keyed
by (session, sender, client id) and each delivery by the message id. Writes go
through the BatchWriter, which shares one transaction among the conversations
that are ready at the same time.
"""

from __future__ import annotations

import logging

from common.store.lifecycle import takes_assistant_reply
from common.store.posted import write_posted
from common.store.postgres import MessageRecord, SessionRecord, Store
from common.store.sessions import SessionChanges, SessionDirectory
from common.transport.bus import Bus
from common.transport.entries import ChatEntry
from worker.assistant.runner import ASSISTANT_ID, ReplyRunner, message_body, reply_key
from worker.writer import BatchWriter

log = logging.getLogger("fanout.worker")


class ChatProcessor:
    """Handles the chat entries of the partitions a worker owns."""

    def __init__(
        self,
        store: Store,
        bus: Bus,
        sessions: SessionDirectory,
        replies: ReplyRunner,
        writer: BatchWriter,
    ) -> None:
        self._store = store
        self._bus = bus
        self._changes = SessionChanges(store, bus, sessions)
        self.replies = replies
        self.writer = writer
        self.processed = 0

    async def handle(self, entry: ChatEntry) -> None:
        """Process one entry; raises on failure (the entry then stays pending)."""
        if entry.role is not None:  # posted over HTTP by a service (SPEC §6)
            written = await write_posted(self._store, entry)
        else:
            written = await self.writer.chat(entry)
        if written is None:
            log.info(
                "session %s is gone; dropping message %s", entry.session_id, entry.client_msg_id
            )
            return
        session, message = written.session, written.message
        self.replies.seen(message)
        await self._bus.deliver(
            session.participants, message_body(message), delivery_key=f"m{message.id}"
        )
        if session.version != written.before.version:
            # pending -> running. Deferred, not raised, if Redis fails here: the entry
            # is stored and acked below, and the sweeper announces the change.
            await self._changes.announce_soon(session.id)
        if written.reply_id is not None:
            # Noted as owed, then made beside the stream (worker/assistant/runner.py):
            # the entry is acknowledged without waiting for the model.
            await self.replies.owe(session, message, written.reply_id, fresh=True)
        elif not written.created and takes_assistant_reply(
            session.status, session.agent, written.role
        ):
            await self._answer_again(session, message)
        self.processed += 1

    async def _answer_again(self, session: SessionRecord, message: MessageRecord) -> None:
        """A re-processed message (its worker died): deliver its reply, or make it."""
        reply = await self._store.find_message(session.id, ASSISTANT_ID, reply_key(message.id))
        if reply is None:
            # Owed already if the worker died after noting it: `owe` keeps that note.
            reply_id = await self._store.next_message_id()
            await self.replies.owe(session, message, reply_id, fresh=False)
            return
        await self._bus.deliver(
            session.participants, message_body(reply), delivery_key=f"m{reply.id}"
        )
