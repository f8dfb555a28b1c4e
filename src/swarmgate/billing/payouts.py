"""Provider payouts and the provider welcome bonus, as ledger transactions.

A payout is a small state machine; every edge that moves money is one balanced ledger
transaction, posted in the same database transaction as the ``payouts`` row update:

===========================  ==============================================================
requested                    ``provider:<acct>`` → ``payouts:pending:<acct>`` (guarded)
requested → approved         no money moves: the amount is already set aside
approved → paid              ``payouts:pending:<acct>`` → ``external:payouts``
requested → rejected         ``payouts:pending:<acct>`` → ``provider:<acct>``
requested → cancelled        ``payouts:pending:<acct>`` → ``provider:<acct>`` (the provider's call)
===========================  ==============================================================

Setting the amount aside at request time means a provider's balance never counts money
already on its way out, so two requests cannot both spend the same earnings, and the
sum of ``payouts:pending:<acct>`` is always the sum of that account's open payouts.

The welcome bonus moves ``external:bonuses`` → ``provider:<acct>`` once per account and
stays locked (not withdrawable) for ``welcome_bonus_lock_days`` after it was granted.

Every money step carries ``(source, external_id)`` = (step, payout id), so the unique
index on ledger transactions refuses a second request, return or payment of one payout
even if a bug tried to post it. Each operation also locks the provider's account row
first (``FOR NO KEY UPDATE`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite), so the
withdrawable check and the debit see the same balance and payout steps of one account
never deadlock each other.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from swarmgate.accounts.keys import new_id, utcnow
from swarmgate.billing.ledger import (
    EXTERNAL_PAYOUTS,
    Posting,
    _post,
    _require_account_id,
    balanced,
    provider_book,
)
from swarmgate.billing.pricing import require_micros
from swarmgate.config import GatewaySettings
from swarmgate.errors import BillingError, IllegalTransition, NotFound, RequestError
from swarmgate.store.db import as_utc, write_transaction
from swarmgate.store.tables import accounts, balances, ledger_entries, ledger_transactions, payouts

EXTERNAL_BONUSES = "external:bonuses"
BONUS_SOURCE = "provider_bonus"
# One source per money step: the (source, payout id) pair is unique in the ledger.
REQUEST_SOURCE = "payout_request"
RETURN_SOURCE = "payout_return"  # a rejection or a cancellation gives the money back
PAID_SOURCE = "payout_paid"
_PAID_KINDS = ("payout", "payout_paid")  # transactions whose money left to external:payouts


def pending_payouts_book(account_id: str) -> str:
    """Where requested and approved payouts wait until they are paid or given back."""
    return f"payouts:pending:{_require_account_id(account_id)}"


# -- the state machine: pure ------------------------------------------------------------
class PayoutStatus(enum.StrEnum):
    REQUESTED = "requested"
    APPROVED = "approved"
    PAID = "paid"
    REJECTED = "rejected"
    CANCELLED = "cancelled"

    @property
    def open(self) -> bool:
        return self in (PayoutStatus.REQUESTED, PayoutStatus.APPROVED)


_EDGES: dict[PayoutStatus, frozenset[PayoutStatus]] = {
    PayoutStatus.REQUESTED: frozenset(
        {PayoutStatus.APPROVED, PayoutStatus.REJECTED, PayoutStatus.CANCELLED}
    ),
    PayoutStatus.APPROVED: frozenset({PayoutStatus.PAID}),
    PayoutStatus.PAID: frozenset(),
    PayoutStatus.REJECTED: frozenset(),
    PayoutStatus.CANCELLED: frozenset(),
}


def check_payout_transition(current: PayoutStatus, target: PayoutStatus) -> None:
    if target not in _EDGES[current]:
        raise IllegalTransition(f"a payout cannot go from {current.value!r} to {target.value!r}")


def request_postings(account_id: str, amount: int) -> list[Posting]:
    return balanced(
        [
            Posting(provider_book(account_id), -amount),
            Posting(pending_payouts_book(account_id), amount),
        ]
    )


def transition_postings(account_id: str, amount: int, target: PayoutStatus) -> list[Posting]:
    """The money an edge into ``target`` moves; empty for approval."""
    pending = pending_payouts_book(account_id)
    if target is PayoutStatus.PAID:
        return balanced([Posting(pending, -amount), Posting(EXTERNAL_PAYOUTS, amount)])
    if target in (PayoutStatus.REJECTED, PayoutStatus.CANCELLED):
        return balanced([Posting(pending, -amount), Posting(provider_book(account_id), amount)])
    return []


def bonus_postings(account_id: str, amount: int) -> list[Posting]:
    return balanced(
        [Posting(EXTERNAL_BONUSES, -amount), Posting(provider_book(account_id), amount)]
    )


# -- what a provider may withdraw --------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ProviderFunds:
    balance_micros: int  # the provider book: earned and not set aside for a payout
    pending_micros: int  # requested or approved payouts, not yet paid
    paid_micros: int  # paid out to date
    bonus_micros: int  # the welcome bonus granted, 0 if none
    bonus_locked_micros: int  # the part of the balance that cannot be withdrawn yet
    bonus_unlocks_at: datetime | None

    @property
    def withdrawable_micros(self) -> int:
        # Pending payouts already left the provider book when they were requested.
        return max(0, self.balance_micros - self.bonus_locked_micros)


async def provider_funds(
    conn: AsyncConnection,
    account_id: str,
    *,
    now: datetime,
    lock_days: int,
    for_update: bool = False,
) -> ProviderFunds:
    provider, pending = provider_book(account_id), pending_payouts_book(account_id)
    books = select(balances.c.book, balances.c.amount_micros).where(
        balances.c.book.in_([provider, pending])
    )
    if for_update:
        books = books.with_for_update()
    amounts = {book: int(amount) for book, amount in await conn.execute(books)}
    paid = await conn.scalar(
        select(func.coalesce(func.sum(ledger_entries.c.amount_micros), 0))
        .select_from(
            ledger_transactions.join(
                ledger_entries, ledger_entries.c.transaction_id == ledger_transactions.c.id
            )
        )
        .where(
            ledger_transactions.c.account_id == account_id,
            ledger_transactions.c.kind.in_(_PAID_KINDS),
            ledger_entries.c.book == EXTERNAL_PAYOUTS,
        )
    )
    bonus = (
        await conn.execute(
            select(ledger_transactions.c.created_at, ledger_entries.c.amount_micros)
            .join(ledger_entries, ledger_entries.c.transaction_id == ledger_transactions.c.id)
            .where(
                ledger_transactions.c.source == BONUS_SOURCE,
                ledger_transactions.c.external_id == account_id,
                ledger_entries.c.book == provider,
            )
        )
    ).first()
    bonus_micros, locked, unlocks_at = 0, 0, None
    if bonus is not None:
        bonus_micros = int(bonus.amount_micros)
        unlocks_at = as_utc(bonus.created_at) + timedelta(days=lock_days)
        locked = bonus_micros if now < unlocks_at else 0
    return ProviderFunds(
        balance_micros=amounts.get(provider, 0),
        pending_micros=amounts.get(pending, 0),
        paid_micros=int(paid or 0),
        bonus_micros=bonus_micros,
        bonus_locked_micros=locked,
        bonus_unlocks_at=unlocks_at,
    )


async def _lock_account(conn: AsyncConnection, account_id: str) -> None:
    """Serialises one account's payout steps (and is the existence check).

    FOR NO KEY UPDATE, not FOR UPDATE: rows that merely reference the account (its holds,
    its ledger transactions) take KEY SHARE locks, which this does not block.
    """
    found = await conn.scalar(
        select(accounts.c.id).where(accounts.c.id == account_id).with_for_update(key_share=True)
    )
    if found is None:
        raise NotFound(f"no account {account_id!r}", param="account")


# -- the welcome bonus -------------------------------------------------------------------
async def grant_provider_bonus(
    conn: AsyncConnection, account_id: str, *, amount_micros: int, now: datetime
) -> str | None:
    """Credits the provider welcome bonus inside the caller's transaction, once per account.

    Returns the bonus transaction's id (the first one's on a repeat), or None when the
    bonus is off (``amount_micros`` 0). Marks the account a provider: the UPDATE is also
    what takes its row lock (the write lock on SQLite), so two devices registering at
    once grant it once.
    """
    if amount_micros == 0:
        return None
    require_micros(amount_micros, "provider_welcome_bonus_micros")
    marked = await conn.execute(
        update(accounts).where(accounts.c.id == account_id).values(is_provider=True)
    )
    if marked.rowcount != 1:
        raise NotFound(f"no account {account_id!r}", param="account")
    existing = await conn.scalar(
        select(ledger_transactions.c.id).where(
            ledger_transactions.c.source == BONUS_SOURCE,
            ledger_transactions.c.external_id == account_id,
        )
    )
    if existing is not None:
        return str(existing)
    return await _post(
        conn,
        kind="provider_bonus",
        account_id=account_id,
        postings=bonus_postings(account_id, amount_micros),
        now=now,
        source=BONUS_SOURCE,
        external_id=account_id,
        memo="provider welcome bonus",
    )


# -- payouts -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Payout:
    id: str
    account_id: str
    amount_micros: int
    status: PayoutStatus
    destination: str | None
    note: str | None
    transaction_id: str | None  # the last ledger transaction that moved its money
    created_at: datetime
    decided_at: datetime | None
    paid_at: datetime | None

    @classmethod
    def from_row(cls, row: Any) -> Payout:
        return cls(
            id=row.id,
            account_id=row.account_id,
            amount_micros=int(row.amount_micros),
            status=PayoutStatus(row.status),
            destination=row.destination,
            note=row.note,
            transaction_id=row.transaction_id,
            created_at=as_utc(row.created_at),
            decided_at=as_utc(row.decided_at) if row.decided_at else None,
            paid_at=as_utc(row.paid_at) if row.paid_at else None,
        )


_STEP_SOURCE = {
    PayoutStatus.PAID: PAID_SOURCE,
    PayoutStatus.REJECTED: RETURN_SOURCE,
    PayoutStatus.CANCELLED: RETURN_SOURCE,
}
_STEP_KIND = {
    PayoutStatus.PAID: "payout_paid",
    PayoutStatus.REJECTED: "payout_return",
    PayoutStatus.CANCELLED: "payout_return",
}
MAX_LIST = 500


class Payouts:
    """Requests, decisions and payments of provider payouts; each one database transaction."""

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        threshold_micros: int,
        bonus_lock_days: int,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._engine = engine
        self._threshold = threshold_micros
        self._lock_days = bonus_lock_days
        self._clock = clock

    @classmethod
    def from_settings(cls, engine: AsyncEngine, settings: GatewaySettings) -> Payouts:
        return cls(
            engine,
            threshold_micros=settings.payout_threshold_micros,
            bonus_lock_days=settings.welcome_bonus_lock_days,
        )

    def _now(self) -> datetime:
        # SQLite stores wall-clock text, so every stored instant must be UTC to compare.
        return as_utc(self._clock()).astimezone(UTC)

    async def funds(self, account_id: str) -> ProviderFunds:
        async with self._engine.connect() as conn:
            return await provider_funds(
                conn, account_id, now=self._now(), lock_days=self._lock_days
            )

    async def grant_bonus(self, account_id: str, amount_micros: int) -> str | None:
        async with write_transaction(self._engine) as conn:
            return await grant_provider_bonus(
                conn, account_id, amount_micros=amount_micros, now=self._now()
            )

    async def request(
        self, account_id: str, amount_micros: int, *, destination: str | None = None
    ) -> Payout:
        """Sets ``amount_micros`` of a provider's withdrawable earnings aside for a payout."""
        require_micros(amount_micros)
        if amount_micros < self._threshold:
            raise RequestError(
                f"a payout must be at least {self._threshold} micro-dollars; "
                f"{amount_micros} was asked",
                param="amount_micros",
                code="PAYOUT_BELOW_THRESHOLD",
            )

        def short(_book: str, _amount: int) -> Exception:
            return _insufficient(amount_micros, None)

        now = self._now()
        payout_id = new_id("po")
        async with write_transaction(self._engine) as conn:
            await _lock_account(conn, account_id)
            funds = await provider_funds(
                conn, account_id, now=now, lock_days=self._lock_days, for_update=True
            )
            if amount_micros > funds.withdrawable_micros:
                raise _insufficient(amount_micros, funds)
            transaction_id = await _post(
                conn,
                kind="payout_request",
                account_id=account_id,
                postings=request_postings(account_id, amount_micros),
                now=now,
                on_shortfall=short,
                source=REQUEST_SOURCE,
                external_id=payout_id,
                memo=f"payout {payout_id}",
            )
            await conn.execute(
                insert(payouts).values(
                    id=payout_id,
                    account_id=account_id,
                    amount_micros=amount_micros,
                    status=PayoutStatus.REQUESTED.value,
                    destination=destination,
                    transaction_id=transaction_id,
                    created_at=now,
                )
            )
            return await _load(conn, payout_id)

    async def cancel(self, account_id: str, payout_id: str) -> Payout:
        """The provider withdraws its own request; the amount goes back to its balance."""
        return await self._move(payout_id, PayoutStatus.CANCELLED, owner=account_id)

    async def approve(self, payout_id: str, note: str | None = None) -> Payout:
        return await self._move(payout_id, PayoutStatus.APPROVED, note=note)

    async def reject(self, payout_id: str, note: str | None = None) -> Payout:
        return await self._move(payout_id, PayoutStatus.REJECTED, note=note)

    async def mark_paid(self, payout_id: str, note: str | None = None) -> Payout:
        return await self._move(payout_id, PayoutStatus.PAID, note=note)

    async def _move(
        self,
        payout_id: str,
        target: PayoutStatus,
        *,
        owner: str | None = None,
        note: str | None = None,
    ) -> Payout:
        now = self._now()
        async with write_transaction(self._engine) as conn:
            current = await _find(conn, payout_id)
            if current is None or (owner is not None and current.account_id != owner):
                raise NotFound(f"no payout {payout_id!r}", param="payout")
            await _lock_account(conn, current.account_id)
            current = await _load(conn, payout_id)  # as of the lock: another step may have won
            check_payout_transition(current.status, target)
            values: dict[str, Any] = {"status": target.value}
            if target is PayoutStatus.PAID:
                values["paid_at"] = now
            else:
                values["decided_at"] = now
            if note is not None:
                values["note"] = note
            claimed = await conn.execute(
                update(payouts)
                .where(payouts.c.id == payout_id, payouts.c.status == current.status.value)
                .values(**values)
            )
            if claimed.rowcount != 1:
                # Only reachable if a step skipped the account lock: refuse, never move twice.
                raise IllegalTransition(f"payout {payout_id!r} changed while being decided")
            postings = transition_postings(current.account_id, current.amount_micros, target)
            if postings:
                transaction_id = await _post(
                    conn,
                    kind=_STEP_KIND[target],
                    account_id=current.account_id,
                    postings=postings,
                    now=now,
                    source=_STEP_SOURCE[target],
                    external_id=payout_id,
                    memo=f"payout {payout_id} {target.value}",
                )
                await conn.execute(
                    update(payouts)
                    .where(payouts.c.id == payout_id)
                    .values(transaction_id=transaction_id)
                )
            return await _load(conn, payout_id)

    async def get(self, payout_id: str, *, owner: str | None = None) -> Payout:
        async with self._engine.connect() as conn:
            found = await _find(conn, payout_id)
        if found is None or (owner is not None and found.account_id != owner):
            raise NotFound(f"no payout {payout_id!r}", param="payout")
        return found

    async def list_payouts(
        self,
        *,
        account_id: str | None = None,
        status: PayoutStatus | None = None,
        limit: int = 100,
    ) -> list[Payout]:
        """Newest first."""
        query = select(payouts).order_by(payouts.c.created_at.desc(), payouts.c.id.desc())
        if account_id is not None:
            query = query.where(payouts.c.account_id == account_id)
        if status is not None:
            query = query.where(payouts.c.status == status.value)
        query = query.limit(max(1, min(limit, MAX_LIST)))
        async with self._engine.connect() as conn:
            return [Payout.from_row(row) for row in await conn.execute(query)]


def _insufficient(amount: int, funds: ProviderFunds | None) -> BillingError:
    available = "" if funds is None else f"; {funds.withdrawable_micros} can be withdrawn now"
    if funds is not None and funds.bonus_locked_micros:
        available += (
            f" ({funds.bonus_locked_micros} of the welcome bonus unlocks at "
            f"{funds.bonus_unlocks_at.isoformat() if funds.bonus_unlocks_at else 'a later date'})"
        )
    return BillingError(
        f"a payout of {amount} micro-dollars exceeds the provider's earnings{available}",
        param="amount_micros",
        code="INSUFFICIENT_EARNINGS",
    )


async def _find(conn: AsyncConnection, payout_id: str) -> Payout | None:
    row = (await conn.execute(select(payouts).where(payouts.c.id == payout_id))).first()
    return None if row is None else Payout.from_row(row)


async def _load(conn: AsyncConnection, payout_id: str) -> Payout:
    found = await _find(conn, payout_id)
    if found is None:
        raise NotFound(f"no payout {payout_id!r}", param="payout")
    return found
