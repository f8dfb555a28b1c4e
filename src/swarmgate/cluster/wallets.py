"""Developers' credit shared by every gateway: reservations in Redis, money in the ledger.

Scaled out, a request's hold cannot live in one gateway's memory (another gateway would
spend the same credit), and a ledger hold per request serialises every request of a
developer on that developer's balance row in PostgreSQL. So each developer book has a
wallet in Redis, changed only by atomic Lua scripts, with the arithmetic of
``billing/wallets.py``::

    available = bal - held

``bal``    the developer book's balance in the ledger as last loaded, plus every change
           to it committed since by a gateway (charges, top-ups, ledger holds);
``held``   the sum of the open reservations: the most the requests now running may
           still cost.

A reservation is taken only if ``available`` covers it and every charge is at most its
reservation, so the ledger's developer book never goes below zero from requests. The
ledger stays the record: a charge is committed to the database first (in batches, by
the settlement writer) and only then applied to ``bal`` as the reservation is released.

**Every change to a developer book goes through an entry.** Before a gateway writes a
change to the ledger it opens an entry in the wallet (a reservation, or an empty marker
for a credit); after the commit it resolves the entry with the amount the book moved.
Entries expire (``ttl``), so a gateway that dies mid-request gives its reservations back.

**Loading.** ``bal`` is (re)read from the ledger when the wallet is missing and before a
request would be refused (money may have arrived from outside). A load is exact only if
no change was committed but not yet applied while it read, so it is stored only when no
entry is open and the wallet's generation — bumped by every resolve — did not move
between the read and the store; otherwise the wallet keeps its value, which can then only
lag behind by changes still being applied (and at worst refuse a request that a moment
later would pass, never overdraw: the ledger's own guard is the last word).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from swarmgate.accounts.keys import new_id
from swarmgate.billing.ledger import Ledger
from swarmgate.cluster.keys import WALLET_IDLE_TTL_S, ClusterKeys
from swarmgate.config import GatewaySettings

log = logging.getLogger("swarmgate.cluster")

# Shared by the scripts: the server's clock in milliseconds, and the sweep of entries
# past their expiry (their amounts leave ``held``; the generation moves). An entry that
# expires belonged to a gateway that died: the ledger may hold its change, so the wallet
# is marked stale and loaded again at its next quiet moment.
# KEYS: wallet hash, entries hash (id -> amount), expiry zset (id -> ms), generation.
_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local old = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, 256)
if #old > 0 then
  local freed = 0
  for _, id in ipairs(old) do
    freed = freed + tonumber(redis.call('HGET', KEYS[2], id) or '0')
    redis.call('HDEL', KEYS[2], id)
  end
  redis.call('ZREM', KEYS[3], unpack(old))
  if redis.call('EXISTS', KEYS[1]) == 1 then
    redis.call('HINCRBY', KEYS[1], 'held', 0 - freed)
    redis.call('HSET', KEYS[1], 'stale', 1)
  end
  redis.call('INCR', KEYS[4])
end
local idle = tonumber(ARGV[#ARGV])
"""

# ARGV: entry id, amount, ttl ms, check (1: a reservation that must be covered; 0: a
# marker of zero), idle ttl s. Returns {1, available after} / {0, available} / {-1, 0}
# when the wallet is not loaded (a reservation needs it; a marker does not).
_OPEN = (
    _PRELUDE
    + """
local amount = tonumber(ARGV[2])
local available = 0
if ARGV[4] == '1' then
  local w = redis.call('HMGET', KEYS[1], 'bal', 'held', 'stale')
  if not w[1] then return {-1, 0} end
  if w[3] and redis.call('HLEN', KEYS[2]) == 0 then return {-1, 0} end
  available = tonumber(w[1]) - tonumber(w[2] or '0')
  if available < amount then return {0, available} end
  redis.call('HINCRBY', KEYS[1], 'held', amount)
  redis.call('EXPIRE', KEYS[1], idle)
  available = available - amount
else
  amount = 0
end
redis.call('HSET', KEYS[2], ARGV[1], amount)
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[3]), ARGV[1])
redis.call('EXPIRE', KEYS[2], idle)
redis.call('EXPIRE', KEYS[3], idle)
return {1, available}
"""
)

# ARGV: entry id, amount the book moved (committed; negative for a charge), idle ttl s.
# Releases the entry (if it has not expired) and applies the movement to a loaded wallet.
# Returns {1, available} for a loaded wallet, {0, 0} for one that is not.
_RESOLVE = (
    _PRELUDE
    + """
local held = redis.call('HGET', KEYS[2], ARGV[1])
if held then
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
end
redis.call('INCR', KEYS[4])
redis.call('EXPIRE', KEYS[4], idle)
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, 0} end
local h = 0
if held then h = redis.call('HINCRBY', KEYS[1], 'held', 0 - tonumber(held))
else h = tonumber(redis.call('HGET', KEYS[1], 'held') or '0') end
local bal = redis.call('HINCRBY', KEYS[1], 'bal', tonumber(ARGV[2]))
redis.call('EXPIRE', KEYS[1], idle)
return {1, bal - h}
"""
)

# ARGV: generation seen before the ledger was read, the ledger's balance, idle ttl s.
# Stores the balance only if nothing moved meanwhile and no entry is open.
_LOAD = (
    _PRELUDE
    + """
local gen = redis.call('GET', KEYS[4]) or '0'
if gen ~= ARGV[1] then return 0 end
if redis.call('HLEN', KEYS[2]) > 0 then return 0 end
redis.call('HSET', KEYS[1], 'bal', ARGV[2], 'held', 0)
redis.call('HDEL', KEYS[1], 'stale')
redis.call('EXPIRE', KEYS[1], idle)
redis.call('INCR', KEYS[4])
redis.call('EXPIRE', KEYS[4], idle)
return 1
"""
)

# ARGV: entry id, ttl ms. Extends a live entry's lease (a request still running).
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZADD', KEYS[1], 'XX', 'CH', now + tonumber(ARGV[2]), ARGV[1])
"""

# Returns {bal, held}, or {} when the wallet is not loaded (or stale, and quiet: load it).
_READ = (
    _PRELUDE
    + """
local w = redis.call('HMGET', KEYS[1], 'bal', 'held', 'stale')
if not w[1] then return {} end
if w[3] and redis.call('HLEN', KEYS[2]) == 0 then return {} end
return {tonumber(w[1]), tonumber(w[2] or '0')}
"""
)

LOADED = 1
SHORT = 0
NOT_LOADED = -1

# A wallet that cannot be loaded because entries stay open (possible only after Redis
# lost the wallet while requests ran): tries, a few milliseconds apart.
_LOAD_TRIES = 50
_LOAD_PAUSE_S = 0.02


class WalletUnavailable(Exception):
    """The wallet could not be loaded now (entries stayed open); retry later."""


@dataclass(frozen=True, slots=True)
class Reserved:
    ok: bool
    available: int  # after the reservation when ok; what there was when not


BalanceReader = Callable[[], Awaitable[int]]


def reservation_ttl_s(settings: GatewaySettings) -> float:
    """How long an entry lives unless renewed: the gateway that opened it renews the
    reservations of its running requests every third of this, so only a dead gateway's
    expire."""
    return settings.cluster_reservation_lease_s


class RedisWallets:
    """Reservations and balances per developer book, shared by every gateway."""

    def __init__(self, redis: Redis, keys: ClusterKeys, *, entry_ttl_s: float) -> None:
        self._redis = redis
        self._keys = keys
        self._entry_ttl_ms = max(1, round(entry_ttl_s * 1000))
        self._open: Any = redis.register_script(_OPEN)
        self._resolve: Any = redis.register_script(_RESOLVE)
        self._load: Any = redis.register_script(_LOAD)
        self._read: Any = redis.register_script(_READ)
        self._renew: Any = redis.register_script(_RENEW)
        self.lease_s = entry_ttl_s

    def _wallet_keys(self, account_id: str, sandbox: bool) -> list[str]:
        return self._keys.wallet(account_id, sandbox)

    async def reserve(
        self, account_id: str, sandbox: bool, entry: str, amount: int, read: BalanceReader
    ) -> Reserved:
        """Takes ``amount`` for ``entry`` if the book covers it, loading the wallet from
        the ledger (``read``) when Redis has none; a shortfall is re-checked once against
        a fresh load (money may have come from outside)."""
        keys = self._wallet_keys(account_id, sandbox)
        reloaded = False
        for _ in range(_LOAD_TRIES):
            status, available = await self._open(
                keys=keys, args=[entry, amount, self._entry_ttl_ms, 1, WALLET_IDLE_TTL_S]
            )
            status = int(status)
            if status == LOADED:
                return Reserved(True, int(available))
            if status == SHORT:
                if reloaded:
                    return Reserved(False, int(available))
                reloaded = True
                # Stored only if exact; otherwise the check below sees the same wallet.
                await self._try_load(keys, read)
                continue
            if not await self._try_load(keys, read):
                await asyncio.sleep(_LOAD_PAUSE_S)
        raise WalletUnavailable(f"the wallet of {account_id} could not be loaded")

    async def mark(self, account_id: str, sandbox: bool, entry: str) -> None:
        """Opens an empty entry before a credit to the book is written to the ledger."""
        await self._open(
            keys=self._wallet_keys(account_id, sandbox),
            args=[entry, 0, self._entry_ttl_ms, 0, WALLET_IDLE_TTL_S],
        )

    async def resolve(self, account_id: str, sandbox: bool, entry: str, moved: int) -> int | None:
        """Closes ``entry`` once the ledger committed (or gave up) its change of ``moved``
        micro-dollars to the book (0: nothing was written); the credit now available
        (None when the wallet is not loaded)."""
        loaded, available = await self._resolve(
            keys=self._wallet_keys(account_id, sandbox), args=[entry, moved, WALLET_IDLE_TTL_S]
        )
        return int(available) if int(loaded) == 1 else None

    async def renew(self, entries: list[tuple[str, bool, str]]) -> None:
        """Extends the leases of (account, sandbox, entry) still open, in one round trip."""
        if not entries:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for account_id, sandbox, entry in entries:
                await self._renew(
                    keys=[self._wallet_keys(account_id, sandbox)[2]],
                    args=[entry, self._entry_ttl_ms],
                    client=pipe,
                )
            await pipe.execute()

    async def load(self, account_id: str, sandbox: bool, read: BalanceReader) -> bool:
        """Re-reads the book from the ledger; True if it was stored (see the module)."""
        return await self._try_load(self._wallet_keys(account_id, sandbox), read)

    async def _try_load(self, keys: list[str], read: BalanceReader) -> bool:
        generation = await self._redis.get(keys[3])
        seen = generation.decode() if isinstance(generation, bytes) else str(generation or "0")
        balance = await read()
        return int(await self._load(keys=keys, args=[seen, balance, WALLET_IDLE_TTL_S])) == 1

    async def read(self, account_id: str, sandbox: bool, read: BalanceReader) -> tuple[int, int]:
        """(balance, held) of the book, loading the wallet if Redis has none."""
        keys = self._wallet_keys(account_id, sandbox)
        for _ in range(_LOAD_TRIES):
            state = await self._read(keys=keys, args=[WALLET_IDLE_TTL_S])
            if state:
                return int(state[0]), int(state[1])
            if not await self._try_load(keys, read):
                await asyncio.sleep(_LOAD_PAUSE_S)
        raise WalletUnavailable(f"the wallet of {account_id} could not be loaded")


async def announced_credit(
    wallets: RedisWallets,
    ledger: Ledger,
    account_id: str,
    amount_micros: int,
    source: str,
    external_id: str | None = None,
    *,
    sandbox: bool = False,
    memo: str | None = None,
) -> str:
    """A top-up (payment, admin grant) written to the ledger between a marker in the
    account's wallet and its resolution, so no load of the wallet can miss or double it;
    returns the ledger transaction's id (the first one's, for a replayed event)."""
    entry = new_id("mark")
    await wallets.mark(account_id, sandbox, entry)
    posted = False
    try:
        transaction_id, posted = await ledger.credit(
            account_id, amount_micros, source, external_id, sandbox=sandbox, memo=memo
        )
    finally:
        try:
            await wallets.resolve(account_id, sandbox, entry, amount_micros if posted else 0)
        except Exception as exc:
            # The marker expires; until then the wallet cannot be re-read, and it is exact
            # again at the next load.
            log.warning("applying a top-up to a shared wallet failed: %s", type(exc).__name__)
    return transaction_id
