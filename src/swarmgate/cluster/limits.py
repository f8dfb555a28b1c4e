"""Per-key rate limits shared by every gateway: the token buckets of
``accounts/limits.py``, kept in Redis and changed only by atomic Lua scripts.

The arithmetic is the in-process limiter's (capacity per minute, refill capacity/60 per
second, a request takes 1 request and its token bound, unused tokens come back); the
clock is the Redis server's, so gateways whose clocks differ still agree.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

from redis.asyncio import Redis

from swarmgate.accounts.keys import KeySettings
from swarmgate.accounts.limits import Admission, rate_limited
from swarmgate.cluster.keys import RATE_BUCKET_TTL_S, ClusterKeys

log = logging.getLogger("swarmgate.cluster")

# KEYS: request bucket, token bucket. ARGV: rpm, tpm (-1: no limit), tokens, ttl seconds.
# Returns {1, tokens taken} or {0, seconds to wait (a string: Lua numbers become integers)}.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local limits = {tonumber(ARGV[1]), tonumber(ARGV[2])}
local wants = {1, math.min(tonumber(ARGV[3]), math.max(limits[2], 0))}
local levels = {}
local wait = 0
for i = 1, 2 do
  local cap = limits[i]
  if cap >= 0 then
    local state = redis.call('HMGET', KEYS[i], 'cap', 'tokens', 'at')
    local tokens = cap
    if tonumber(state[1]) == cap then
      tokens = math.min(cap, tonumber(state[2]) + (now - tonumber(state[3])) * cap / 60)
    end
    levels[i] = tokens
    local deficit = wants[i] - tokens
    if deficit > 0 then
      if cap == 0 then return {0, '60'} end
      wait = math.max(wait, deficit / (cap / 60))
    end
  end
end
if wait > 0 then return {0, tostring(wait)} end
for i = 1, 2 do
  if limits[i] >= 0 then
    redis.call('HSET', KEYS[i], 'cap', limits[i], 'tokens', tostring(levels[i] - wants[i]),
      'at', tostring(now))
    redis.call('EXPIRE', KEYS[i], tonumber(ARGV[4]))
  end
end
if limits[2] >= 0 then return {1, wants[2]} end
return {1, 0}
"""

# KEYS: token bucket. ARGV: tokens to give back. Refills first; never above the capacity.
_GIVE_BACK = """
local state = redis.call('HMGET', KEYS[1], 'cap', 'tokens', 'at')
if not state[1] then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local cap = tonumber(state[1])
local tokens = math.min(cap, tonumber(state[2]) + (now - tonumber(state[3])) * cap / 60)
tokens = math.min(cap, tokens + tonumber(ARGV[1]))
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
return 1
"""


class RedisRateLimiter:
    """Token buckets per key in Redis; the same calls as ``accounts.limits.RateLimiter``."""

    def __init__(self, redis: Redis, keys: ClusterKeys) -> None:
        self._redis = redis
        self._keys = keys
        self._admit: Any = redis.register_script(_ADMIT)
        self._give_back: Any = redis.register_script(_GIVE_BACK)
        self._returning: set[asyncio.Task[None]] = set()

    async def admit(self, key_id: str | None, settings: KeySettings, tokens: int) -> Admission:
        if key_id is None or (settings.rpm_limit is None and settings.tpm_limit is None):
            return Admission(key_id)
        rpm = -1 if settings.rpm_limit is None else settings.rpm_limit
        tpm = -1 if settings.tpm_limit is None else settings.tpm_limit
        ok, value = await self._admit(
            keys=[self._keys.rate(key_id, "req"), self._keys.rate(key_id, "tok")],
            args=[rpm, tpm, tokens, RATE_BUCKET_TTL_S],
        )
        if int(ok) == 1:
            return Admission(key_id, int(value))
        raise rate_limited(settings, max(1, math.ceil(float(value))))

    def finish(self, admission: Admission, tokens_used: int) -> None:
        """Gives the unused tokens back in the background (the request path never waits
        for it; until it lands the key is limited a little more, never less)."""
        unused = admission.tokens_taken - tokens_used
        admission.tokens_taken = 0
        if admission.key_id is None or unused <= 0:
            return
        task = asyncio.get_running_loop().create_task(self._return(admission.key_id, unused))
        self._returning.add(task)
        task.add_done_callback(self._returning.discard)

    async def _return(self, key_id: str, tokens: int) -> None:
        try:
            await self._give_back(keys=[self._keys.rate(key_id, "tok")], args=[tokens])
        except Exception:
            log.warning("giving unused tokens back to a rate bucket failed", exc_info=True)

    async def drain(self) -> None:
        """Waits for the give-backs under way (tests, shutdown)."""
        while self._returning:
            await asyncio.gather(*list(self._returning), return_exceptions=True)
