"""``Billing``: holds, settlement and voids for the request path, and the gateway's
one door to developers' balances.

A request is priced before it runs: its hold is the most it can cost (an upper bound
of its prompt tokens plus ``max_tokens`` at the model's prices). Without the credit, or
past its key's daily spend cap, it is refused with 402 and nothing runs. When the job
completes, the real usage is charged (at most the hold), the provider of the device
that served it earns its share, and the charge is committed before the answer leaves
the gateway. A failed, timed-out or cancelled job voids its hold: nothing is charged.

Synchronous requests reserve their credit in memory (``billing/wallets.py``) and their
charges are written in batches (``billing/settlement.py``). Queued asynchronous jobs,
which outlive a request and a gateway restart, hold their credit in the ledger itself.
Scaled out, the reservations are in Redis instead (``cluster/wallets.py``), shared by
every gateway, and every change this class makes to a developer book is announced there
before it is written and applied there after it is committed.

Every change to a developer's balance made while the gateway runs goes through this
class, so its in-memory view stays exact; anything else (the admin CLI) is picked up
by re-reading the balance before a request would be refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, TypeVar

import orjson
from redis.exceptions import RedisError
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from swarmgate.accounts.keys import Principal, new_id, utcnow
from swarmgate.billing.ledger import (
    EXPIRE_BATCH,
    Balance,
    Ledger,
    developer_book,
    holds_book,
)
from swarmgate.billing.pricing import job_cost_micros, max_cost_micros, split_earnings
from swarmgate.billing.settlement import (
    ChargeRefused,
    PendingCharge,
    SettlementWriter,
    plan_batch,
    post_plan,
)
from swarmgate.billing.wallets import KeySpend, Wallet
from swarmgate.catalog import Pricing
from swarmgate.cluster.wallets import RedisWallets, WalletUnavailable, announced_credit
from swarmgate.errors import BillingUnavailable, InsufficientCredits, SpendCapReached
from swarmgate.store.tables import charges, holds

log = logging.getLogger("swarmgate.billing")
_T = TypeVar("_T")

# Chat templates add a few tokens around every message and before the answer.
_TOKENS_PER_MESSAGE = 8
_TOKENS_PER_PROMPT = 16


def prompt_token_bound(texts: Iterable[str]) -> int:
    """An upper bound on the prompt's tokens, known before any tokenizer has run.

    The catalog's models use byte-level tokenizers, where every token covers at least
    one byte of UTF-8 text, so the byte count bounds the token count; the chat
    template's own tokens are added per message.
    """
    total = _TOKENS_PER_PROMPT
    for text in texts:
        total += len(text.encode()) + _TOKENS_PER_MESSAGE
    return total


@dataclass(slots=True)
class RequestHold:
    """The credit reserved for one request; resolved exactly once (settled or voided)."""

    account_id: str
    key_id: str | None
    sandbox: bool
    model: str
    pricing: Pricing
    amount_micros: int
    job_id: str
    wallet: Wallet | None  # None: the credit is reserved in Redis (scaled out)
    spend: KeySpend | None
    created: float = field(default_factory=time.monotonic)
    ledger_hold_id: str | None = None  # asynchronous jobs: the hold is in the ledger
    resolved: bool = False


def moved_by(charge: PendingCharge) -> int:
    """What a committed charge moved in its developer book: a charge against a ledger hold
    gives the hold back and spends the charge; any other only spends."""
    held = charge.held_micros if charge.hold_id is not None else 0
    return held - charge.charged_micros


@dataclass(slots=True)
class _SharedSettlement:
    """A settlement's parts as the writer commits them, for the shared wallet."""

    entry: str
    parts_left: int
    moved: int = 0  # what the committed parts moved in the developer book
    committed: list[PendingCharge] = field(default_factory=list)

    def written(self, pending: PendingCharge, ok: bool) -> bool:
        """Counts one part; True once every part is done."""
        if ok:
            self.moved += moved_by(pending)
            self.committed.append(pending)
        self.parts_left -= 1
        return self.parts_left == 0


class BilledPart(NamedTuple):
    """What one device did for a job, at its price."""

    device_id: str | None
    provider_account_id: str | None
    model: str
    pricing: Pricing
    prompt_tokens: int
    completion_tokens: int


class Charge(NamedTuple):
    charged_micros: int
    provider_micros: int
    platform_micros: int


ChargeListener = Callable[[PendingCharge, int], None]


class Billing:
    def __init__(
        self,
        engine: AsyncEngine,
        *,
        provider_share_bps: int = 8_500,
        hold_ttl_s: float = 3_600.0,
        batch_max: int = 512,
        post_interval_s: float = 0.05,
        enabled: bool = True,
        wallets: RedisWallets | None = None,
    ) -> None:
        self._engine = engine
        # Several gateways share the database: a wallet in this process cannot see what
        # the others reserve, so the wallets are in Redis.
        self.wallets = wallets
        self._applying: set[asyncio.Task[None]] = set()
        self._renewing: asyncio.Task[None] | None = None
        self.ledger = Ledger(engine)
        self._share_bps = provider_share_bps
        self._hold_ttl_s = hold_ttl_s
        self.enabled = enabled
        self.writer = SettlementWriter(engine, batch_max=batch_max, post_interval_s=post_interval_s)
        self._wallets: dict[tuple[str, bool], Wallet] = {}
        self._loading: dict[tuple[str, bool], asyncio.Future[Wallet]] = {}
        self._spend: dict[str, KeySpend] = {}
        self._open: dict[int, RequestHold] = {}  # id(hold) → hold, for the sweeper
        # Called after each committed charge with the account's available credit.
        self.listeners: list[ChargeListener] = []

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Posts charges a previous process left unposted, then starts the writer; before
        any wallet is loaded, so every balance read afterwards includes them."""
        await self.writer.recover()
        self.writer.start()
        if self.wallets is not None:
            self._renewing = asyncio.create_task(self._renew_loop(), name="reservation-leases")

    async def stop(self) -> None:
        if self._renewing is not None:
            self._renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewing
            self._renewing = None
        await self.drain_voids()
        await self.writer.stop()

    async def _renew_loop(self) -> None:
        """Keeps the shared reservations of this gateway's running requests alive."""
        assert self.wallets is not None
        while True:
            await asyncio.sleep(self.wallets.lease_s / 3)
            running = [
                (h.account_id, h.sandbox, h.job_id)
                for h in self._open.values()
                if h.wallet is None and not h.resolved
            ]
            try:
                await self.wallets.renew(running)
            except Exception as exc:
                log.warning("renewing reservation leases failed: %s", type(exc).__name__)

    # -- balances -------------------------------------------------------------------------
    async def _read_book(self, book: str) -> int:
        return (await self.ledger.book_balances([book]))[book]

    async def _wallet(self, account_id: str, sandbox: bool) -> Wallet:
        key = (account_id, sandbox)
        wallet = self._wallets.get(key)
        if wallet is not None:
            return wallet
        loading = self._loading.get(key)
        if loading is None:
            # One read per wallet however many requests arrive while it loads.
            loading = asyncio.get_running_loop().create_future()
            self._loading[key] = loading
            try:
                amount = await self._developer_balance(account_id, sandbox)
            except BaseException as exc:
                del self._loading[key]
                loading.set_exception(exc)
                loading.exception()  # retrieved: later waiters get it from their await
                raise
            wallet = Wallet(committed=amount)
            self._wallets[key] = wallet
            del self._loading[key]
            loading.set_result(wallet)
            return wallet
        return await asyncio.shield(loading)

    async def _developer_balance(self, account_id: str, sandbox: bool) -> int:
        """The developer book net of charges settled but not yet posted to the ledger."""
        pending = await self.writer.developer_balance(account_id, sandbox)
        if pending is not None:
            return pending
        return await self._read_book(developer_book(account_id, sandbox=sandbox))

    async def _resync(self, account_id: str, sandbox: bool, wallet: Wallet) -> None:
        wallet.resync(await self._developer_balance(account_id, sandbox))

    async def balance(self, account_id: str, *, sandbox: bool = False) -> Balance:
        """Available credit (less what running requests may still cost) and held credit."""
        held_in_ledger = await self._read_book(holds_book(account_id, sandbox=sandbox))
        if self.wallets is not None:
            book, held = await self._shared(
                self.wallets.read(account_id, sandbox, self._book_reader(account_id, sandbox))
            )
            return Balance(max(0, book - held), held_in_ledger + held)
        wallet = await self._wallet(account_id, sandbox)
        return Balance(max(0, wallet.available), held_in_ledger + wallet.reserved)

    # -- scaled out: the wallets in Redis -------------------------------------------------
    def _book_reader(self, account_id: str, sandbox: bool) -> Callable[[], Awaitable[int]]:
        return functools.partial(self._read_book, developer_book(account_id, sandbox=sandbox))

    @staticmethod
    async def _shared(call: Awaitable[_T]) -> _T:
        """A call to the shared wallets on the request path: Redis unreachable, or a wallet
        that cannot be loaded now, is a 503 (nothing reserved, nothing charged)."""
        try:
            return await call
        except (RedisError, OSError, WalletUnavailable) as exc:
            log.warning("the shared wallets failed: %s", type(exc).__name__)
            raise BillingUnavailable(
                "Credit cannot be checked right now; nothing was charged. Retry the request."
            ) from exc

    async def _announce(self, account_id: str, sandbox: bool) -> str:
        """Opens a wallet entry before a credit to a developer book is written."""
        assert self.wallets is not None
        entry = new_id("mark")
        await self._shared(self.wallets.mark(account_id, sandbox, entry))
        return entry

    async def _apply(self, account_id: str, sandbox: bool, entry: str, moved: int) -> int | None:
        """Closes a wallet entry with what the ledger committed to the book; the credit
        then available (None: not known). If Redis fails here, the entry expires and the
        wallet is exact again at its next load."""
        assert self.wallets is not None
        try:
            return await self.wallets.resolve(account_id, sandbox, entry, moved)
        except Exception as exc:
            log.warning(
                "applying a committed change to a shared wallet failed: %s",
                type(exc).__name__,
                extra={"job_id": entry},
            )
            return None

    def _later(self, work: Awaitable[object]) -> None:
        async def run() -> None:
            await work

        task = asyncio.get_running_loop().create_task(run())
        self._applying.add(task)
        task.add_done_callback(self._applying.discard)

    async def _settled_shared(self, hold: RequestHold, shared: _SharedSettlement) -> None:
        """Every part of a settlement was written (or refused): the wallet follows."""
        available = await self._apply(hold.account_id, hold.sandbox, shared.entry, shared.moved)
        if not shared.committed:
            return
        if available is None:
            book = developer_book(hold.account_id, sandbox=hold.sandbox)
            try:
                available = await self._read_book(book)
            except Exception:
                log.warning("reading a balance after a charge failed")
                available = 0
        for pending in shared.committed:
            self._notify(pending, available)

    async def top_up(
        self,
        account_id: str,
        amount_micros: int,
        *,
        source: str,
        external_id: str | None = None,
        sandbox: bool = False,
        memo: str | None = None,
    ) -> str:
        """Credits a developer (payment, admin grant); idempotent with an ``external_id``."""
        if self.wallets is not None:
            return await self._shared(
                announced_credit(
                    self.wallets,
                    self.ledger,
                    account_id,
                    amount_micros,
                    source,
                    external_id,
                    sandbox=sandbox,
                    memo=memo,
                )
            )
        transaction_id = await self.ledger.top_up(
            account_id, amount_micros, source, external_id, sandbox=sandbox, memo=memo
        )
        wallet = self._wallets.get((account_id, sandbox))
        if wallet is not None:
            await self._resync(account_id, sandbox, wallet)
        return transaction_id

    # -- the daily cap ------------------------------------------------------------------
    async def _key_spend(self, key_id: str, account_id: str) -> KeySpend:
        today = datetime.now(UTC).date()
        spend = self._spend.get(key_id)
        if spend is not None and spend.day == today:
            return spend
        start = datetime(today.year, today.month, today.day, tzinfo=UTC)
        # The account's index narrows it to today's charges; the key filters those.
        query = select(func.coalesce(func.sum(charges.c.cost_micros), 0)).where(
            charges.c.account_id == account_id,
            charges.c.created_at >= start,
            charges.c.key_id == key_id,
        )
        async with self._engine.connect() as conn:
            committed = int(await conn.scalar(query) or 0)
        spend = self._spend.get(key_id)
        if spend is None or spend.day != today:  # another request may have loaded it
            spend = KeySpend(day=today, committed=committed)
            self._spend[key_id] = spend
        return spend

    async def spent_today(self, key_id: str, account_id: str) -> int:
        return (await self._key_spend(key_id, account_id)).total

    # -- holds ----------------------------------------------------------------------------
    def quote(self, pricing: Pricing, prompt_texts: Iterable[str], max_tokens: int) -> int:
        """The hold for a request: the most it can cost."""
        return max_cost_micros(pricing, prompt_token_bound(prompt_texts), max_tokens)

    @property
    def holds_open(self) -> int:
        """Holds of requests still running (in memory)."""
        return len(self._open)

    def hold_now(
        self, principal: Principal, model: str, pricing: Pricing, amount_micros: int, job_id: str
    ) -> RequestHold | None:
        """``hold`` for the usual request, without a coroutine: the account's wallet is in
        this process's memory and covers ``amount_micros``, and the key has no daily cap.
        None, with nothing reserved, where that is not so; the caller then awaits ``hold``
        (which loads the wallet, checks the cap, or re-reads the balance before a 402)."""
        if type(amount_micros) is not int or amount_micros < 0:
            raise ValueError(f"a hold must be a non-negative int of micros, got {amount_micros!r}")
        if self.wallets is not None or (
            principal.key_id is not None and principal.settings.daily_spend_cap_micros is not None
        ):
            return None
        wallet = self._wallets.get((principal.account_id, principal.sandbox))
        if wallet is None or amount_micros > wallet.committed - wallet.pending - wallet.reserved:
            return None
        wallet.reserved += amount_micros
        hold = RequestHold(  # positional: keywords cost a dict per request
            principal.account_id,
            principal.key_id,
            principal.sandbox,
            model,
            pricing,
            amount_micros,
            job_id,
            wallet,
            None,
        )
        self._open[id(hold)] = hold
        return hold

    async def hold(
        self,
        principal: Principal,
        *,
        model: str,
        pricing: Pricing,
        amount_micros: int,
        job_id: str,
        in_ledger: bool = False,
        also: Callable[[AsyncConnection, str], Awaitable[None]] | None = None,
    ) -> RequestHold:
        """Reserves ``amount_micros`` for a job, or raises 402 and reserves nothing.

        ``in_ledger`` puts the hold in the database (a queued asynchronous job that
        must keep its credit across a restart) instead of memory; ``also(conn, hold_id)``
        then runs in the hold's database transaction.
        """
        if not in_ledger:
            fast = self.hold_now(principal, model, pricing, amount_micros, job_id)
            if fast is not None:
                return fast
        sandbox = principal.sandbox
        spend = (
            None
            if principal.key_id is None or principal.settings.daily_spend_cap_micros is None
            else await self._take_spend(principal, amount_micros)
        )
        if self.wallets is not None:
            return await self._hold_shared(
                principal, model, pricing, amount_micros, job_id, spend, in_ledger, also
            )
        try:
            # The wallet is in memory after the account's first request: no await then.
            wallet = self._wallets.get((principal.account_id, sandbox))
            if wallet is None:
                wallet = await self._wallet(principal.account_id, sandbox)
            if not wallet.can_reserve(amount_micros):
                # The balance may have grown outside this process (an admin top-up).
                await self._resync(principal.account_id, sandbox, wallet)
                if not wallet.can_reserve(amount_micros):
                    raise _insufficient(sandbox, amount_micros, wallet.available)
        except BaseException:
            if spend is not None:
                spend.reserved -= amount_micros
            raise
        # No await between the check above and this line: nothing can slip in between.
        wallet.reserve(amount_micros)
        hold = RequestHold(  # positional: keywords cost a dict per request
            principal.account_id,
            principal.key_id,
            sandbox,
            model,
            pricing,
            amount_micros,
            job_id,
            wallet,
            spend,
        )
        if in_ledger:
            try:
                hold.ledger_hold_id = await self.ledger.hold(
                    principal.account_id,
                    amount_micros,
                    job_id,
                    self._hold_ttl_s,
                    sandbox,
                    also=also,
                )
            except BaseException:
                if spend is not None:
                    spend.reserved -= amount_micros
                raise
            finally:
                wallet.release(amount_micros)
            # The credit now sits in the ledger's holds book, not in the developer book;
            # the ledger expires it by itself.
            wallet.committed -= amount_micros
        else:
            self._open[id(hold)] = hold
        return hold

    async def _take_spend(self, principal: Principal, amount_micros: int) -> KeySpend | None:
        """Counts the request against its key's daily cap (402 if it would pass it)."""
        cap = principal.settings.daily_spend_cap_micros
        if principal.key_id is None or cap is None:
            return None
        spend = await self._key_spend(principal.key_id, principal.account_id)
        if spend.would_pass(cap, amount_micros):
            raise SpendCapReached(
                f"This key's daily spend cap of {cap} micro-dollars would be passed "
                f"(spent or running today: {spend.total}; this request may cost up to "
                f"{amount_micros}). The cap resets at 00:00 UTC."
            )
        spend.reserved += amount_micros
        return spend

    async def _hold_shared(
        self,
        principal: Principal,
        model: str,
        pricing: Pricing,
        amount_micros: int,
        job_id: str,
        spend: KeySpend | None,
        in_ledger: bool,
        also: Callable[[AsyncConnection, str], Awaitable[None]] | None,
    ) -> RequestHold:
        """A reservation in the shared wallet (the job id is its entry); for a queued job
        it then becomes a ledger hold, and the wallet's book follows the money there."""
        assert self.wallets is not None
        account_id, sandbox = principal.account_id, principal.sandbox
        try:
            reserved = await self._shared(
                self.wallets.reserve(
                    account_id,
                    sandbox,
                    job_id,
                    amount_micros,
                    self._book_reader(account_id, sandbox),
                )
            )
        except BaseException:
            if spend is not None:
                spend.reserved -= amount_micros
            raise
        if not reserved.ok:
            if spend is not None:
                spend.reserved -= amount_micros
            raise _insufficient(sandbox, amount_micros, reserved.available)
        hold = RequestHold(
            account_id=account_id,
            key_id=principal.key_id,
            sandbox=sandbox,
            model=model,
            pricing=pricing,
            amount_micros=amount_micros,
            job_id=job_id,
            wallet=None,
            spend=spend,
        )
        if not in_ledger:
            self._open[id(hold)] = hold
            return hold
        moved = 0
        try:
            hold.ledger_hold_id = await self.ledger.hold(
                account_id, amount_micros, job_id, self._hold_ttl_s, sandbox, also=also
            )
            moved = -amount_micros  # into the ledger's holds book
        except BaseException:
            if spend is not None:
                spend.reserved -= amount_micros
            raise
        finally:
            await self._apply(account_id, sandbox, job_id, moved)
        return hold

    def void(self, hold: RequestHold) -> None:
        """Releases a request's reservation: the job failed, timed out or was cancelled.
        A queued job's ledger hold stays (for a rerun); ``void_in_ledger`` gives it back."""
        if hold.resolved:
            return
        hold.resolved = True
        self._open.pop(id(hold), None)
        if hold.ledger_hold_id is None:
            if hold.wallet is not None:
                hold.wallet.release(hold.amount_micros)
            else:
                self._later(self._apply(hold.account_id, hold.sandbox, hold.job_id, 0))
        if hold.spend is not None:
            hold.spend.reserved -= hold.amount_micros

    async def drain_voids(self) -> None:
        """Waits for the changes to shared wallets under way (shutdown, tests)."""
        while self._applying:
            await asyncio.gather(*list(self._applying), return_exceptions=True)

    async def void_in_ledger(self, hold: RequestHold) -> None:
        """Voids a hold (in memory or in the ledger) and gives the credit back."""
        ledger_hold = hold.ledger_hold_id
        self.void(hold)
        if ledger_hold is None:
            return
        if hold.wallet is not None:
            if await self.ledger.void(ledger_hold):
                hold.wallet.committed += hold.amount_micros
            return
        entry = await self._announce(hold.account_id, hold.sandbox)
        voided = False
        try:
            voided = await self.ledger.void(ledger_hold)
        finally:
            moved = hold.amount_micros if voided else 0
            await self._apply(hold.account_id, hold.sandbox, entry, moved)

    def settle(
        self,
        hold: RequestHold,
        *,
        prompt_tokens: int,
        completion_tokens: int,
        device_id: str | None,
        provider_account_id: str | None,
        model: str | None = None,
        pricing: Pricing | None = None,
    ) -> Coroutine[Any, Any, Charge]:
        """Charges the job's real usage (at most the hold); await it: it returns once the
        charge is written.

        ``model`` and ``pricing`` default to the hold's; a request routed to a fallback
        model, or to a device with its own price, is charged for what served it.
        Raises BillingError (503, nothing charged) if the charge could not be written;
        the caller must then not deliver the answer as a paid one.
        (A plain function: it settles at once where ``settle_now`` can — raising there and
        then if the charge is refused — and returns a coroutine that hands the charge
        back, else ``settle_parts``'s coroutine.)
        """
        model = model or hold.model
        pricing = pricing or hold.pricing
        charge = self.settle_now(
            hold, prompt_tokens, completion_tokens, device_id, provider_account_id, model, pricing
        )
        if charge is not None:
            return _ready(charge)
        part = BilledPart(
            device_id, provider_account_id, model, pricing, prompt_tokens, completion_tokens
        )
        return self.settle_parts(hold, (part,))

    def settle_now(
        self,
        hold: RequestHold,
        prompt_tokens: int,
        completion_tokens: int,
        device_id: str | None,
        provider_account_id: str | None,
        model: str,
        pricing: Pricing,
    ) -> Charge | None:
        """``settle`` for the usual request, without a coroutine: one device served it,
        its credit is held in this process's memory, and its charge is durable once
        appended to the SQLite journal. Returns the charge once written, or None, with
        nothing done, where that is not so (the caller then awaits ``settle``); raises
        BillingUnavailable (nothing charged) if the journal refused it.

        The same steps as ``settle_parts`` with ``_resolve_parts`` and ``_written`` for one
        part, in one function: this runs on every request (tests/billing/test_fast_path.py
        holds the two to the same results)."""
        journal = self.writer.journal
        wallet = hold.wallet
        if journal is None or wallet is None or hold.ledger_hold_id is not None:
            return None
        if hold.resolved:
            raise RuntimeError(f"hold for {hold.job_id} is already resolved")
        hold.resolved = True
        self._open.pop(id(hold), None)
        amount = hold.amount_micros
        charged = job_cost_micros(pricing, prompt_tokens, completion_tokens)
        if charged > amount:
            charged = amount
        sandbox = hold.sandbox
        if sandbox:
            provider_account_id = None
            provider = platform = 0
        elif provider_account_id is None:
            provider, platform = 0, charged
        else:
            provider, platform = split_earnings(charged, self._share_bps)
        pending = PendingCharge(  # positional: keywords cost a dict per call
            hold.job_id,
            hold.account_id,
            hold.key_id,
            sandbox,
            model,
            device_id,
            provider_account_id,
            prompt_tokens,
            completion_tokens,
            charged,
            provider,
            platform,
            utcnow(),
        )
        # The reservation ends either way; only a written charge spends.
        wallet.reserved -= amount
        spend = hold.spend
        if spend is not None:
            spend.reserved -= amount
        try:
            journal.append(pending)
        except ChargeRefused as exc:
            raise BillingUnavailable(
                "The answer could not be billed, so it is withheld; you were not charged. "
                "Retry the request."
            ) from exc
        wallet.committed -= charged
        if spend is not None:
            spend.committed += charged
        if self.listeners:
            self._notify(pending, wallet.committed - wallet.pending - wallet.reserved)
        return Charge(charged, provider, platform)

    async def settle_parts(self, hold: RequestHold, parts: Sequence[BilledPart]) -> Charge:
        """Charges an answer made by several devices (a stream continued after its device
        failed): one charge per part, each device paid for its own, together at most the
        hold. The last part's charge carries the job id; earlier ones ``<job id>.<n>``."""
        pendings = self._resolve_parts(hold, parts)
        if len(pendings) == 1:
            only = pendings[0]
            charged, provider, platform = (
                only.charged_micros,
                only.provider_micros,
                only.platform_micros,
            )
        else:
            charged = sum(p.charged_micros for p in pendings)
            provider = sum(p.provider_micros for p in pendings)
            platform = sum(p.platform_micros for p in pendings)
        wallet, spend = hold.wallet, hold.spend
        shared: _SharedSettlement | None = None
        if wallet is None:
            # Shared: the reservation is the entry; a ledger hold's settlement credits the
            # unspent part back to the book, so it is announced first.
            entry = (
                hold.job_id
                if hold.ledger_hold_id is None
                else await self._announce(hold.account_id, hold.sandbox)
            )
            shared = _SharedSettlement(entry, len(pendings))
        elif hold.ledger_hold_id is None:
            wallet.charge(hold.amount_micros, charged)
        if spend is not None:
            spend.reserved -= hold.amount_micros
            spend.pending += charged
        refused: ChargeRefused | None = None
        futures: list[asyncio.Future[None]] = []
        for pending in pendings:
            try:
                done = self.writer.write(pending)
            except ChargeRefused as exc:
                refused = exc
                self._written(hold, shared, pending, False)
                continue
            if done is None:  # durable already: the usual case, on SQLite
                self._written(hold, shared, pending, True)
            else:
                # A callback, not code after the await: it runs even if the request that
                # waits for the charge is cancelled (its client left) in the meantime.
                done.add_done_callback(
                    functools.partial(self._written_future, hold, shared, pending)
                )
                futures.append(done)
        try:
            # Shielded: a client that leaves now does not stop its charge being written.
            for done in futures:
                await asyncio.shield(done)
            if refused is not None:
                raise refused
        except ChargeRefused as exc:
            raise BillingUnavailable(
                "The answer could not be billed, so it is withheld; you were not charged. "
                "Retry the request."
            ) from exc
        return Charge(charged, provider, platform)

    def _written_future(
        self,
        hold: RequestHold,
        shared: _SharedSettlement | None,
        pending: PendingCharge,
        future: asyncio.Future[None],
    ) -> None:
        ok = not future.cancelled() and future.exception() is None
        self._written(hold, shared, pending, ok)

    def _written(
        self,
        hold: RequestHold,
        shared: _SharedSettlement | None,
        pending: PendingCharge,
        ok: bool,
    ) -> None:
        """One of a settlement's charges was written (``ok``) or refused: the wallet and
        the key's spend follow it, and the listeners hear of a written one."""
        amount = pending.charged_micros
        spend = hold.spend
        if spend is not None:
            spend.pending -= amount
            if ok:
                spend.committed += amount
        wallet = hold.wallet
        if wallet is None:
            assert shared is not None
            if shared.written(pending, ok):
                self._later(self._settled_shared(hold, shared))
            return
        if hold.ledger_hold_id is None:
            if ok:
                wallet.committed_charge(amount)
            else:
                wallet.failed_charge(amount)
        elif ok:
            # The part that settled the ledger hold gave it back; the others spent.
            wallet.committed += pending.held_micros - amount
        if ok and self.listeners:
            self._notify(pending, wallet.available)

    def _notify(self, charge: PendingCharge, available_micros: int) -> None:
        for listener in self.listeners:
            try:
                listener(charge, available_micros)
            except Exception:
                log.exception("a charge listener failed")

    def _resolve_parts(self, hold: RequestHold, parts: Sequence[BilledPart]) -> list[PendingCharge]:
        """Marks the hold resolved and prices its charges (together at most the hold)."""
        if hold.resolved:
            raise RuntimeError(f"hold for {hold.job_id} is already resolved")
        if not parts:
            raise ValueError("a settlement needs at least one part")
        hold.resolved = True
        self._open.pop(id(hold), None)
        left = hold.amount_micros
        sandbox = hold.sandbox
        pendings: list[PendingCharge] = []
        last = len(parts) - 1
        for index, part in enumerate(parts):
            cost = job_cost_micros(part.pricing, part.prompt_tokens, part.completion_tokens)
            charged = min(cost, left)
            left -= charged
            provider_account_id = None if sandbox else part.provider_account_id
            if provider_account_id is None:
                provider, platform = 0, (0 if sandbox else charged)
            else:
                provider, platform = split_earnings(charged, self._share_bps)
            first = index == 0
            # Positional: this runs on every request, and keywords cost a dict per call.
            pendings.append(
                PendingCharge(
                    hold.job_id if index == last else f"{hold.job_id}.{index + 1}",
                    hold.account_id,
                    hold.key_id,
                    sandbox,
                    part.model,
                    part.device_id,
                    provider_account_id,
                    part.prompt_tokens,
                    part.completion_tokens,
                    charged,
                    provider,
                    platform,
                    utcnow(),
                    # A ledger hold is settled by the first part (which gives the whole hold
                    # back less its own cost); later parts are paid from what came back.
                    hold.ledger_hold_id if first else None,
                    hold.amount_micros if first else 0,
                )
            )
        return pendings

    # -- asynchronous jobs: holds in the ledger ---------------------------------------------
    async def reopen(
        self, hold_id: str, *, key_id: str | None, model: str, pricing: Pricing, job_id: str
    ) -> RequestHold | None:
        """A queued job's ledger hold, if it is still open (after a restart, say)."""
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    select(holds.c.account_id, holds.c.amount_micros, holds.c.sandbox).where(
                        holds.c.id == hold_id, holds.c.status == "open"
                    )
                )
            ).first()
        if row is None:
            return None
        wallet = None
        if self.wallets is None:
            wallet = await self._wallet(row.account_id, bool(row.sandbox))
        hold = RequestHold(
            account_id=row.account_id,
            key_id=key_id,
            sandbox=bool(row.sandbox),
            model=model,
            pricing=pricing,
            amount_micros=int(row.amount_micros),
            job_id=job_id,
            wallet=wallet,
            spend=None,
            ledger_hold_id=hold_id,
        )
        return hold

    async def settle_with(
        self,
        hold: RequestHold,
        write: Callable[[AsyncConnection], Awaitable[None]],
        *,
        prompt_tokens: int,
        completion_tokens: int,
        device_id: str | None,
        provider_account_id: str | None,
        model: str | None = None,
        pricing: Pricing | None = None,
    ) -> Charge:
        """Settles a ledger hold in one database transaction with ``write`` (the job's
        result), so a crash leaves either both or neither."""
        part = BilledPart(
            device_id,
            provider_account_id,
            model or hold.model,
            pricing or hold.pricing,
            prompt_tokens,
            completion_tokens,
        )
        (pending,) = self._resolve_parts(hold, [part])
        entry: str | None = None
        available: int | None = None
        if hold.wallet is None:
            if hold.ledger_hold_id is None:
                entry = hold.job_id
            else:
                entry = await self._announce(hold.account_id, hold.sandbox)
        moved = 0
        try:
            async with self.ledger.writing() as conn:
                await post_plan(conn, plan_batch([pending]))
                await write(conn)
            moved = moved_by(pending)
        except ChargeRefused as exc:
            raise BillingUnavailable(
                "The job's result could not be billed; you were not charged."
            ) from exc
        finally:
            if entry is not None:
                available = await self._apply(hold.account_id, hold.sandbox, entry, moved)
        if hold.wallet is None:
            self._notify(pending, available or 0)
            return Charge(pending.charged_micros, pending.provider_micros, pending.platform_micros)
        if hold.ledger_hold_id is None:
            hold.wallet.committed -= pending.charged_micros
        else:
            hold.wallet.committed += hold.amount_micros - pending.charged_micros
        self._notify(pending, hold.wallet.available)
        return Charge(pending.charged_micros, pending.provider_micros, pending.platform_micros)

    # -- the sweeper ----------------------------------------------------------------------
    async def sweep(self) -> int:
        """Voids holds that outlived their TTL: in the ledger, and in memory (a leak)."""
        if self.wallets is not None:
            expired = await self._expire_shared()
        else:
            expired = await self.ledger.expire_holds()
        if expired and self.wallets is None:
            # Released ledger holds went back to developer books; read them again.
            for (account_id, sandbox), wallet in list(self._wallets.items()):
                if wallet.pending == 0:
                    await self._resync(account_id, sandbox, wallet)
        cutoff = time.monotonic() - self._hold_ttl_s
        for hold in [h for h in self._open.values() if h.created < cutoff]:
            log.error("voiding a hold that outlived its TTL", extra={"job_id": hold.job_id})
            self.void(hold)
            expired += 1
        return expired

    def open_holds(self) -> int:
        return len(self._open)

    async def _expire_shared(self) -> int:
        """The ledger's expired holds, each announced to its wallet and applied there."""
        expired = 0
        while True:
            due = await self.ledger.due_holds()
            for hold in due:
                entry = await self._announce(hold.account_id, hold.sandbox)
                released = False
                try:
                    released = await self.ledger.expire_hold(hold.id)
                finally:
                    moved = hold.amount_micros if released else 0
                    await self._apply(hold.account_id, hold.sandbox, entry, moved)
                expired += released
            if len(due) < EXPIRE_BATCH:
                return expired


async def _ready(charge: Charge) -> Charge:
    return charge


def _insufficient(sandbox: bool, amount_micros: int, available_micros: int) -> InsufficientCredits:
    kind = "sandbox credit" if sandbox else "credit"
    return InsufficientCredits(
        f"Insufficient {kind}: this request may cost up to {amount_micros} micro-dollars "
        f"and {max(0, available_micros)} are available. Top up, or lower max_tokens."
    )


def month_bounds(now: datetime) -> tuple[datetime, datetime]:
    """The calendar month (UTC) containing ``now``: [start, end)."""
    start = datetime(now.year, now.month, 1, tzinfo=UTC)
    following = (start + timedelta(days=32)).replace(day=1)
    return start, following


def usd_number(micros: int) -> orjson.Fragment:
    """A dollar amount as a JSON number written from integers: no float is involved."""
    return orjson.Fragment(as_usd(micros).encode())


def as_usd(micros: int) -> str:
    """Micro-dollars as a dollar string with six decimals, from integers only."""
    sign = "-" if micros < 0 else ""
    whole, fraction = divmod(abs(micros), 1_000_000)
    return f"{sign}{whole}.{fraction:06d}"
