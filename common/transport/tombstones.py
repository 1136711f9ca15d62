"""Deleting a session removes its messages from the users' delivery logs (SPEC §6).

Each `message` frame of the session in a user's log is replaced, under the same seq,
by a tombstone: ``{"seq":N,"type":"session","session_id":S,"status":"deleted"}``. A
resume after the delete therefore replays none of the session's content, and the
seq stream keeps no gap (a gap would read as a lost frame). A stream entry cannot be
edited in place, nor re-added below the stream's last id, so the script rebuilds the
log: it is bounded (FANOUT_USER_LOG_MAXLEN entries) and only rebuilt when it holds a
frame of the session.

A message a worker stored just before the delete and delivers just after it can
land in a log after the rewrite; the delete runs the rewrite a second time after
`SECOND_PASS_AFTER` seconds to catch those (a task the eraser owns; a node stopping
within that time cancels it, and such a message stays in the log).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

import redis.asyncio as aioredis

from common.errors import SERVICE_DOWN
from common.protocol import encode
from common.transport.keys import Keys

log = logging.getLogger("fanout.sessions")

# Seconds between the two passes: longer than a worker takes from storing a message to
# delivering it, short enough to keep the second pass owned by the request's node.
SECOND_PASS_AFTER = 2.0

# KEYS: the user's log. ARGV: the start of a frame of the session after its seq
# (`"type":"message","session_id":"S"`), the tombstone without its seq prefix.
# Returns how many frames were replaced.
_ERASE = """
local entries = redis.call('XRANGE', KEYS[1], '-', '+')
local marker, hits = ARGV[1], {}
for i = 1, #entries do
  local frame = entries[i][2][2]
  local comma = string.find(frame, ',', 1, true)
  if comma and string.sub(frame, comma + 1, comma + #marker) == marker then
    hits[i] = true
  end
end
if next(hits) == nil then return 0 end
local ttl = redis.call('PTTL', KEYS[1])
redis.call('DEL', KEYS[1])
local replaced = 0
for i = 1, #entries do
  local id, frame = entries[i][1], entries[i][2][2]
  if hits[i] then
    frame = string.sub(frame, 1, string.find(frame, ',', 1, true)) .. ARGV[2]
    replaced = replaced + 1
  end
  redis.call('XADD', KEYS[1], id, 'f', frame)
end
if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
return replaced
"""


def tombstone_body(session_id: str) -> bytes:
    """What replaces a deleted session's message after its ``{"seq":N,`` prefix."""
    return encode({"type": "session", "session_id": session_id, "status": "deleted"})[1:]


class LogEraser:
    """Replaces a deleted session's messages in its participants' delivery logs."""

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self._keys = keys
        self._erase = redis.register_script(_ERASE)
        self._later: set[asyncio.Task[None]] = set()

    async def erase(self, user_ids: Iterable[str], session_id: str) -> int:
        """One pass over the users' logs; how many frames were replaced."""
        marker = encode({"type": "message", "session_id": session_id})[1:-1]
        tombstone = tombstone_body(session_id)
        replaced = await asyncio.gather(
            *(
                self._erase(keys=[self._keys.log(user)], args=[marker, tombstone])
                for user in dict.fromkeys(user_ids)
            )
        )
        return sum(int(n) for n in replaced)

    def erase_again_later(self, user_ids: list[str], session_id: str) -> None:
        """The second pass (see the module docstring), owned here until `close`."""
        task = asyncio.create_task(self._second_pass(user_ids, session_id), name="log-erase")
        self._later.add(task)
        task.add_done_callback(self._later.discard)

    async def _second_pass(self, user_ids: list[str], session_id: str) -> None:
        await asyncio.sleep(SECOND_PASS_AFTER)
        try:
            late = await self.erase(user_ids, session_id)
        except SERVICE_DOWN as exc:
            log.warning("session %s: second log erase failed (%r)", session_id, exc)
            return
        if late:
            log.info("session %s: %d late message(s) erased from logs", session_id, late)

    async def close(self) -> None:
        """Cancel the second passes still waiting (their first pass is done) and wait."""
        tasks = list(self._later)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
