"""How fast one sender may write into another user's delivery log (issue 13, README "Limits").

Anyone can be made a participant of a session by its owner, and every chat there is
logged for every participant. Without a bound, one stranger could push a user's
bounded log (FANOUT_USER_LOG_MAXLEN) past their unread messages in seconds. So each
(sender, recipient) pair has a token bucket: FANOUT_PEER_BURST frames at once,
refilled at FANOUT_PEER_RATE per second. A chat is accepted only if every other
participant's bucket has a token, and then takes one from each (all or nothing, in
one script); otherwise it is refused with RATE_LIMIT before it is enqueued.

All buckets of one sender are fields of one hash, hash-tagged by the sender, so one
script call checks a whole session (one Redis Cluster slot). A field is
"tokens stamp"; a missing field is a full bucket. The hash expires once every bucket
in it would be full again (burst / rate seconds after its last use).
"""

from __future__ import annotations

import math
from collections.abc import Collection

import redis.asyncio as aioredis

from common.transport.connection import RespConnection, run_script
from common.transport.keys import Keys

# KEYS: the sender's bucket hash. ARGV: rate per second, burst, the hash's TTL (s),
# then the recipients. Returns 0 (accepted, a token taken from every bucket) or the
# 1-based position of the first recipient whose bucket is empty (nothing taken).
_TAKE = """
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1000000
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local n = #ARGV - 3
local stored = redis.call('HMGET', KEYS[1], unpack(ARGV, 4))
local fields = {}
for i = 1, n do
  local tokens = burst
  local value = stored[i]
  if value then
    local space = string.find(value, ' ', 1, true)
    local level = tonumber(string.sub(value, 1, space - 1))
    local stamp = tonumber(string.sub(value, space + 1))
    tokens = math.min(burst, level + math.max(0, now - stamp) * rate)
  end
  if tokens < 1 then return i end
  fields[2 * i - 1] = ARGV[i + 3]
  fields[2 * i] = string.format('%.4f %.6f', tokens - 1, now)
end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 0
"""


class PeerLimiter:
    """Per (sender, recipient) token buckets in Redis, shared by every node."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        *,
        rate: float,
        burst: int,
        commands: RespConnection | None = None,
    ) -> None:
        self._keys = keys
        self._script = redis.register_script(_TAKE)
        self._commands = commands
        self._args: list[str | int | float] = [rate, burst, math.ceil(burst / rate) + 1]

    async def refused(self, sender: str, recipients: Collection[str]) -> str | None:
        """Take a token from each (sender, recipient) bucket, or from none and return
        the first recipient whose bucket is empty. The sender is not its own peer."""
        others = [r for r in recipients if r != sender]
        if not others:
            return None
        keys = [self._keys.peer_buckets(sender)]
        args: list[str | int | float] = [*self._args, *others]
        if self._commands is not None:
            result = await run_script(self._commands, self._script, keys, args)
        else:
            result = await self._script(keys=keys, args=args)
        position = int(result)
        return others[position - 1] if position else None
