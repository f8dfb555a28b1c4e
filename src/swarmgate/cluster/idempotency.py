"""``Idempotency-Key`` records shared by every gateway, in Redis: the calls of
``store/idempotency.py`` (claim, replay, mismatch, in progress, take-over) as one atomic
script per claim. Records expire by themselves after ``idempotency_ttl_s``."""

from __future__ import annotations

from typing import Any

import orjson
from redis.asyncio import Redis

from swarmgate.cluster.keys import ClusterKeys
from swarmgate.store.idempotency import StoredResponse, contended, in_progress, mismatch

# KEYS: the record. ARGV: fingerprint, ttl seconds, take-over seconds.
# Returns {'claimed'} | {'mismatch'} | {'running'} | {'done', status, headers, body}.
_BEGIN = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local row = redis.call('HMGET', KEYS[1], 'hash', 'status', 'created', 'code', 'headers', 'body')
if not row[1] then
  redis.call('HSET', KEYS[1], 'hash', ARGV[1], 'status', 'in_progress', 'created', tostring(now))
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
  return {'claimed'}
end
if row[1] ~= ARGV[1] then return {'mismatch'} end
if row[2] == 'done' then return {'done', row[4], row[5], row[6]} end
if tonumber(row[3]) + tonumber(ARGV[3]) > now then return {'running'} end
redis.call('HSET', KEYS[1], 'created', tostring(now))
return {'claimed'}
"""


class RedisIdempotencyStore:
    def __init__(
        self, redis: Redis, keys: ClusterKeys, *, ttl_s: float, takeover_after_s: float
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._ttl_s = max(1, int(ttl_s))
        self._takeover_s = takeover_after_s
        self._begin: Any = redis.register_script(_BEGIN)

    async def begin(self, account_id: str, key: str, fingerprint: str) -> StoredResponse | None:
        """Claims the key for this request (None: run it) or returns the stored response.
        Raises IdempotencyMismatch or Conflict as the database store does."""
        reply = await self._begin(
            keys=[self._keys.idempotency(account_id, key)],
            args=[fingerprint, self._ttl_s, self._takeover_s],
        )
        verdict = _text(reply[0])
        if verdict == "claimed":
            return None
        if verdict == "mismatch":
            raise mismatch()
        if verdict == "running":
            raise in_progress()
        if verdict == "done":
            return StoredResponse(
                status=int(reply[1]),
                headers=[
                    (name.encode("latin-1"), value.encode("latin-1"))
                    for name, value in orjson.loads(reply[2] or b"[]")
                ],
                body=bytes(reply[3] or b""),
            )
        raise contended()

    async def finish(self, account_id: str, key: str, response: StoredResponse | None) -> None:
        """Stores the response for replays, or (None) frees the key for a retry."""
        name = self._keys.idempotency(account_id, key)
        if response is None:
            await self._redis.delete(name)
            return
        headers = orjson.dumps(
            [(n.decode("latin-1"), v.decode("latin-1")) for n, v in response.headers]
        )
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                name,
                mapping={
                    "status": "done",
                    "code": response.status,
                    "headers": headers,
                    "body": response.body,
                },
            )
            pipe.expire(name, self._ttl_s, nx=True)  # if it expired meanwhile: a fresh TTL
            await pipe.execute()

    async def purge_expired(self) -> int:
        """Nothing to do: Redis expires the records by itself."""
        return 0


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
