"""The double-entry ledger: top-ups, holds, settlement, voids, expiry and payouts.

Money lives in *books*, named pots keyed by a string:

=========================  ======================================================
``developer:<acct>``       a developer's available credit
``holds:<acct>``           credit reserved for jobs that are running
``provider:<acct>``        a provider's earnings not yet paid out
``platform:revenue``       the platform's share of every job
``external:topups``        the outside world money comes from (goes negative)
``external:payouts``       the outside world provider payouts go to
``sandbox:<acct>``         an ``sg_test_`` developer's play credit
``sandbox:holds:<acct>``   play credit reserved for running sandbox jobs
``sandbox:usage``          where settled sandbox charges go: nobody earns them
``external:sandbox``       where play credit comes from (goes negative)
``payouts:pending:<acct>`` a provider's requested payouts, set aside until paid
``external:bonuses``       where providers' welcome bonuses come from
=========================  ======================================================

Request charges are posted by ``billing/settlement.py`` (one transaction per account per
group commit), payouts and bonuses by ``billing/payouts.py``; both use this module's
postings and guards.

Every ledger transaction is a set of signed entries (+ into a book, - out of it)
that sums to zero, so money is only ever moved, never made or lost, and the sum
of all books is always zero. ``balances`` holds each book's running total and is
updated in the same database transaction as the entries, so reading a balance is
one primary-key lookup.

Nothing but an ``external:`` book may go negative. Every debit of any other book
is a guarded ``UPDATE balances SET amount = amount - x WHERE book = b AND amount >= x``
whose rowcount says whether the money was there: one atomic statement on SQLite and
PostgreSQL alike, so two racing holds can never both spend the same credit. A CHECK
constraint on ``balances`` backs the guard up.

Each operation is one database transaction. On SQLite it starts with
``BEGIN IMMEDIATE``, taking the single write lock before the first read. Without it,
Python's sqlite3 runs any read that precedes the first write outside the transaction
(it issues BEGIN only before DML), so a read-then-write acts on stale data; and a
deferred transaction that reads and then writes gets SQLITE_BUSY at once, without
waiting out busy_timeout, when another writer committed in between. On PostgreSQL, balance
rows are always updated in book-name order, so concurrent transactions lock them in
one order and cannot deadlock.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import Row, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from swarmgate.accounts.keys import new_id, utcnow
from swarmgate.billing.pricing import (
    BASIS_POINTS,
    PROVIDER_SHARE_BPS,
    require_micros,
    split_earnings,
)
from swarmgate.errors import BillingError, InsufficientCredits, NotFound, RequestError
from swarmgate.store.db import as_utc, write_transaction
from swarmgate.store.tables import accounts, balances, holds, ledger_entries, ledger_transactions

PLATFORM_REVENUE = "platform:revenue"
EXTERNAL_TOPUPS = "external:topups"
EXTERNAL_PAYOUTS = "external:payouts"
EXTERNAL_SANDBOX = "external:sandbox"
SANDBOX_USAGE = "sandbox:usage"
EXTERNAL_PREFIX = "external:"

WELCOME_SOURCE = "welcome"  # the credit granted when an account is created
EXPIRE_BATCH = 500


# -- books ------------------------------------------------------------------------------
def _require_account_id(account_id: str) -> str:
    # A colon would let one account's book name alias another book.
    if not account_id or ":" in account_id:
        raise ValueError(f"not an account id: {account_id!r}")
    return account_id


def developer_book(account_id: str, *, sandbox: bool = False) -> str:
    prefix = "sandbox" if sandbox else "developer"
    return f"{prefix}:{_require_account_id(account_id)}"


def holds_book(account_id: str, *, sandbox: bool = False) -> str:
    prefix = "sandbox:holds" if sandbox else "holds"
    return f"{prefix}:{_require_account_id(account_id)}"


def provider_book(account_id: str) -> str:
    return f"provider:{_require_account_id(account_id)}"


# -- postings: the pure arithmetic of each operation -----------------------------------
class Posting(NamedTuple):
    book: str
    amount_micros: int  # signed: + into the book, - out of it


def balanced(postings: Iterable[Posting]) -> list[Posting]:
    """Nets postings per book, drops zeros, sorts by book; refuses any that do not sum to 0."""
    net: dict[str, int] = {}
    for book, amount in postings:
        if not isinstance(amount, int) or isinstance(amount, bool):
            raise TypeError(f"posting to {book} is not an int: {amount!r}")
        net[book] = net.get(book, 0) + amount
    total = sum(net.values())
    if total != 0:
        raise ValueError(f"ledger transaction does not balance: entries sum to {total}")
    return [Posting(book, amount) for book, amount in sorted(net.items()) if amount != 0]


def top_up_postings(account_id: str, amount: int, *, sandbox: bool = False) -> list[Posting]:
    source = EXTERNAL_SANDBOX if sandbox else EXTERNAL_TOPUPS
    return balanced(
        [Posting(source, -amount), Posting(developer_book(account_id, sandbox=sandbox), amount)]
    )


def hold_postings(account_id: str, amount: int, *, sandbox: bool = False) -> list[Posting]:
    return balanced(
        [
            Posting(developer_book(account_id, sandbox=sandbox), -amount),
            Posting(holds_book(account_id, sandbox=sandbox), amount),
        ]
    )


def release_postings(account_id: str, amount: int, *, sandbox: bool = False) -> list[Posting]:
    """A void or an expiry: the whole hold goes back to the developer."""
    return balanced(
        [
            Posting(holds_book(account_id, sandbox=sandbox), -amount),
            Posting(developer_book(account_id, sandbox=sandbox), amount),
        ]
    )


def settle_postings(
    account_id: str,
    held: int,
    charged: int,
    provider_account_id: str,
    provider_share_bps: int = PROVIDER_SHARE_BPS,
    *,
    sandbox: bool = False,
) -> list[Posting]:
    """Empties the hold: ``charged`` is earned (or, in the sandbox, spent), the rest released."""
    if not 0 <= charged <= held:
        raise ValueError(f"cannot charge {charged} from a hold of {held}")
    postings = [
        Posting(holds_book(account_id, sandbox=sandbox), -held),
        Posting(developer_book(account_id, sandbox=sandbox), held - charged),
    ]
    if sandbox:
        # Play money: no provider earns it and the platform books no revenue.
        postings.append(Posting(SANDBOX_USAGE, charged))
    else:
        provider, platform = split_earnings(charged, provider_share_bps)
        postings.append(Posting(provider_book(provider_account_id), provider))
        postings.append(Posting(PLATFORM_REVENUE, platform))
    return balanced(postings)


def payout_postings(provider_account_id: str, amount: int) -> list[Posting]:
    return balanced(
        [Posting(provider_book(provider_account_id), -amount), Posting(EXTERNAL_PAYOUTS, amount)]
    )


# -- results ----------------------------------------------------------------------------
class Balance(NamedTuple):
    available_micros: int
    held_micros: int


class DueHold(NamedTuple):
    id: str
    account_id: str
    sandbox: bool
    amount_micros: int


@dataclass(frozen=True, slots=True)
class Settlement:
    hold_id: str
    transaction_id: str
    charged_micros: int  # the actual cost, capped at the hold
    provider_micros: int  # 0 for sandbox holds
    platform_micros: int  # 0 for sandbox holds
    released_micros: int  # what went back to the developer's available credit


Shortfall = Callable[[str, int], Exception]


def _invariant_broken(book: str, amount: int) -> Exception:
    # A holds book always covers its open holds; if not, the ledger is corrupt.
    return RuntimeError(f"ledger invariant broken: {book} cannot cover {amount} micros")


# -- writing ----------------------------------------------------------------------------
def add_to_balance(dialect_name: str, book: str, amount: int) -> Any:
    """INSERT … ON CONFLICT DO UPDATE: credits a book, creating its row on first use."""
    make_insert = postgresql.insert if dialect_name == "postgresql" else sqlite.insert
    statement = make_insert(balances).values(book=book, amount_micros=amount)
    return statement.on_conflict_do_update(
        index_elements=[balances.c.book],
        set_={"amount_micros": balances.c.amount_micros + statement.excluded.amount_micros},
    )


async def _move_balances(
    conn: AsyncConnection, postings: list[Posting], on_shortfall: Shortfall
) -> None:
    for book, amount in postings:  # sorted by book: one lock order for every transaction
        if amount < 0 and not book.startswith(EXTERNAL_PREFIX):
            guarded = (
                update(balances)
                .where(balances.c.book == book, balances.c.amount_micros >= -amount)
                .values(amount_micros=balances.c.amount_micros + amount)
            )
            if (await conn.execute(guarded)).rowcount != 1:
                raise on_shortfall(book, -amount)
        else:
            await conn.execute(add_to_balance(conn.dialect.name, book, amount))


async def _post(
    conn: AsyncConnection,
    *,
    kind: str,
    account_id: str,
    postings: list[Posting],
    now: datetime,
    on_shortfall: Shortfall = _invariant_broken,
    job_id: str | None = None,
    hold_id: str | None = None,
    source: str | None = None,
    external_id: str | None = None,
    memo: str | None = None,
) -> str:
    """Moves the balances (guarded), then records the transaction and its entries."""
    postings = balanced(postings)  # the one place every posting passes: the zero-sum check
    await _move_balances(conn, postings, on_shortfall)
    transaction_id = new_id("txn")
    await conn.execute(
        insert(ledger_transactions).values(
            id=transaction_id,
            kind=kind,
            account_id=account_id,
            job_id=job_id,
            hold_id=hold_id,
            source=source,
            external_id=external_id,
            created_at=now,
            memo=memo,
        )
    )
    if postings:
        await conn.execute(
            insert(ledger_entries),
            [
                {"transaction_id": transaction_id, "book": book, "amount_micros": amount}
                for book, amount in postings
            ],
        )
    return transaction_id


async def _require_account(conn: AsyncConnection, account_id: str) -> None:
    if await conn.scalar(select(accounts.c.id).where(accounts.c.id == account_id)) is None:
        raise NotFound(f"no account {account_id!r}", param="account")


async def _replayed_top_up(
    conn: AsyncConnection, source: str, external_id: str, account_id: str, credited: Posting
) -> str | None:
    """The top-up already posted for this external event, if any; refuses a different one."""
    existing = (
        await conn.execute(
            select(ledger_transactions.c.id, ledger_transactions.c.account_id).where(
                ledger_transactions.c.source == source,
                ledger_transactions.c.external_id == external_id,
            )
        )
    ).first()
    if existing is None:
        return None
    entries = await conn.execute(
        select(ledger_entries.c.book, ledger_entries.c.amount_micros).where(
            ledger_entries.c.transaction_id == existing.id
        )
    )
    if existing.account_id != account_id or credited not in [Posting(*e) for e in entries]:
        raise RequestError(
            f"{source} event {external_id!r} was already posted as a different top-up",
            param="external_id",
        )
    return str(existing.id)


async def post_top_up(
    conn: AsyncConnection,
    *,
    account_id: str,
    amount_micros: int,
    source: str,
    external_id: str | None = None,
    sandbox: bool = False,
    memo: str | None = None,
    now: datetime | None = None,
) -> str:
    """Credits a developer inside the caller's transaction (e.g. ``create_account``'s).

    With an ``external_id`` it is idempotent: the same (source, external_id) posts once
    and later calls return the first transaction's id.
    """
    transaction_id, _posted = await _post_credit(
        conn,
        account_id=account_id,
        amount_micros=amount_micros,
        source=source,
        external_id=external_id,
        sandbox=sandbox,
        memo=memo,
        now=now,
    )
    return transaction_id


async def _post_credit(
    conn: AsyncConnection,
    *,
    account_id: str,
    amount_micros: int,
    source: str,
    external_id: str | None,
    sandbox: bool,
    memo: str | None,
    now: datetime | None,
) -> tuple[str, bool]:
    """``post_top_up``, also saying whether it posted (False: a replay of an earlier one)."""
    require_micros(amount_micros)
    await _require_account(conn, account_id)
    if external_id is not None:
        credited = Posting(developer_book(account_id, sandbox=sandbox), amount_micros)
        replayed = await _replayed_top_up(conn, source, external_id, account_id, credited)
        if replayed is not None:
            return replayed, False
    transaction_id = await _post(
        conn,
        kind="top_up",
        account_id=account_id,
        postings=top_up_postings(account_id, amount_micros, sandbox=sandbox),
        now=as_utc(now or utcnow()).astimezone(UTC),
        source=source,
        external_id=external_id,
        memo=memo,
    )
    return transaction_id, True


# PostgreSQL: a request's hold in one statement (one round trip, prepared once per
# connection). The guarded UPDATE gates every other part: when the developer book cannot
# cover the amount, nothing is written and the count is 0. Books are touched in the
# order every ledger transaction uses (sorted), so holds never deadlock with settlements.
_PG_HOLD = """
WITH moved AS (
    UPDATE balances SET amount_micros = amount_micros - $1::bigint
    WHERE book = $2::text AND amount_micros >= $1::bigint
    RETURNING 1
), held AS (
    INSERT INTO balances (book, amount_micros) SELECT $3::text, $1::bigint FROM moved
    ON CONFLICT (book) DO UPDATE SET amount_micros = balances.amount_micros + EXCLUDED.amount_micros
    RETURNING 1
), hold AS (
    INSERT INTO holds (id, account_id, amount_micros, status, job_id, sandbox, expires_at,
                       created_at)
    SELECT $4::text, $5::text, $1::bigint, 'open', $6::text, $7::boolean, $8::timestamptz,
           $9::timestamptz
    FROM moved
    RETURNING 1
), txn AS (
    INSERT INTO ledger_transactions (id, kind, account_id, job_id, hold_id, created_at)
    SELECT $10::text, 'hold', $5::text, $6::text, $4::text, $9::timestamptz FROM moved
    RETURNING 1
), entries AS (
    INSERT INTO ledger_entries (transaction_id, book, amount_micros)
    SELECT $10::text, e.book, e.amount FROM moved,
        (VALUES ($2::text, -$1::bigint), ($3::text, $1::bigint)) AS e(book, amount)
    RETURNING 1
)
SELECT count(*) FROM moved
"""


class Ledger:
    """Every money movement of the gateway; each method is one database transaction."""

    def __init__(self, engine: AsyncEngine, *, clock: Callable[[], datetime] = utcnow) -> None:
        self._engine = engine
        self._clock = clock

    def _now(self, now: datetime | None = None) -> datetime:
        # SQLite stores wall-clock text, so every stored instant must be UTC to compare.
        return as_utc(now or self._clock()).astimezone(UTC)

    @asynccontextmanager
    async def writing(self) -> AsyncIterator[AsyncConnection]:
        async with write_transaction(self._engine) as conn:
            yield conn

    async def top_up(
        self,
        account_id: str,
        amount_micros: int,
        source: str,
        external_id: str | None = None,
        *,
        sandbox: bool = False,
        memo: str | None = None,
    ) -> str:
        """Credits a developer from outside (a payment, an admin grant); returns the txn id."""
        transaction_id, _posted = await self.credit(
            account_id, amount_micros, source, external_id, sandbox=sandbox, memo=memo
        )
        return transaction_id

    async def credit(
        self,
        account_id: str,
        amount_micros: int,
        source: str,
        external_id: str | None = None,
        *,
        sandbox: bool = False,
        memo: str | None = None,
    ) -> tuple[str, bool]:
        """``top_up``, also saying whether this call posted it (False: a replay)."""
        require_micros(amount_micros)
        try:
            async with self.writing() as conn:
                return await _post_credit(
                    conn,
                    account_id=account_id,
                    amount_micros=amount_micros,
                    source=source,
                    external_id=external_id,
                    sandbox=sandbox,
                    memo=memo,
                    now=self._now(),
                )
        except IntegrityError:
            # PostgreSQL: a concurrent replay of the same event won the unique index.
            if external_id is None:
                raise
            credited = Posting(developer_book(account_id, sandbox=sandbox), amount_micros)
            async with self._engine.connect() as conn:
                replayed = await _replayed_top_up(conn, source, external_id, account_id, credited)
            if replayed is None:
                raise
            return replayed, False

    async def hold(
        self,
        account_id: str,
        amount_micros: int,
        job_id: str | None,
        ttl_s: float,
        sandbox: bool = False,
        also: Callable[[AsyncConnection, str], Awaitable[None]] | None = None,
    ) -> str:
        """Reserves credit for a job; raises InsufficientCredits (writing nothing) if short.

        ``also(conn, hold_id)`` runs in the same database transaction (the queued job's
        own row), so the hold never exists without what it was taken for.
        """
        require_micros(amount_micros, allow_zero=True)
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        now = self._now()
        hold_id = new_id("hold")

        def short(_book: str, _amount: int) -> Exception:
            kind = "sandbox credit" if sandbox else "credit"
            return InsufficientCredits(
                f"insufficient {kind}: this request may cost up to {amount_micros} micro-dollars"
            )

        if also is None and amount_micros > 0 and self._engine.dialect.name == "postgresql":
            async with self._engine.connect() as conn:
                raw = await conn.get_raw_connection()
                driver: Any = raw.driver_connection
                taken = await driver.fetchval(
                    _PG_HOLD,
                    amount_micros,
                    developer_book(account_id, sandbox=sandbox),
                    holds_book(account_id, sandbox=sandbox),
                    hold_id,
                    account_id,
                    job_id,
                    sandbox,
                    now + timedelta(seconds=ttl_s),
                    now,
                    new_id("txn"),
                )
            if taken != 1:
                raise short("", amount_micros)
            return hold_id

        async with self.writing() as conn:
            await conn.execute(
                insert(holds).values(
                    id=hold_id,
                    account_id=account_id,
                    amount_micros=amount_micros,
                    status="open",
                    job_id=job_id,
                    sandbox=sandbox,
                    expires_at=now + timedelta(seconds=ttl_s),
                    created_at=now,
                )
            )
            await _post(
                conn,
                kind="hold",
                account_id=account_id,
                postings=hold_postings(account_id, amount_micros, sandbox=sandbox),
                now=now,
                on_shortfall=short,
                job_id=job_id,
                hold_id=hold_id,
            )
            if also is not None:
                await also(conn, hold_id)
        return hold_id

    async def _claim_hold(
        self, conn: AsyncConnection, hold_id: str, status: str, now: datetime
    ) -> Row[Any] | None:
        """Moves an open hold to ``status``; None if it was already resolved.

        The conditional UPDATE is what makes settle, void and expiry exactly-once:
        of any number of racing resolutions, one matches ``status = 'open'``.
        """
        claim = (
            update(holds)
            .where(holds.c.id == hold_id, holds.c.status == "open")
            .values(status=status, resolved_at=now)
            .returning(holds.c.account_id, holds.c.amount_micros, holds.c.job_id, holds.c.sandbox)
        )
        claimed = (await conn.execute(claim)).first()
        if claimed is None:
            current = await conn.scalar(select(holds.c.status).where(holds.c.id == hold_id))
            if current is None:
                raise NotFound(f"no hold {hold_id!r}", param="hold")
        return claimed

    async def settle(
        self,
        hold_id: str,
        actual_cost_micros: int,
        provider_account_id: str,
        provider_share_bps: int = PROVIDER_SHARE_BPS,
    ) -> Settlement:
        """Charges a finished job from its hold, pays the provider its share, releases the rest.

        The charge is capped at the hold: the hold is the most the developer agreed to
        pay, so an under-estimated job costs the platform, never the developer. A hold
        that is no longer open (settled, voided, expired) raises HOLD_NOT_OPEN.
        """
        require_micros(actual_cost_micros, "actual_cost_micros", allow_zero=True)
        if not 0 <= provider_share_bps <= BASIS_POINTS:
            raise ValueError(f"provider_share_bps must be 0..{BASIS_POINTS}")
        now = self._now()
        async with self.writing() as conn:
            hold = await self._claim_hold(conn, hold_id, "settled", now)
            if hold is None:
                status = await conn.scalar(select(holds.c.status).where(holds.c.id == hold_id))
                raise BillingError(f"hold {hold_id!r} is {status}, not open", code="HOLD_NOT_OPEN")
            charged = min(actual_cost_micros, hold.amount_micros)
            if not hold.sandbox:
                await _require_account(conn, provider_account_id)
            postings = settle_postings(
                hold.account_id,
                hold.amount_micros,
                charged,
                provider_account_id,
                provider_share_bps,
                sandbox=hold.sandbox,
            )
            await conn.execute(
                update(holds).where(holds.c.id == hold_id).values(charged_micros=charged)
            )
            transaction_id = await _post(
                conn,
                kind="settle",
                account_id=hold.account_id,
                postings=postings,
                now=now,
                job_id=hold.job_id,
                hold_id=hold_id,
                memo=None if hold.sandbox else f"provider {provider_account_id}",
            )
        provider, platform = (0, 0) if hold.sandbox else split_earnings(charged, provider_share_bps)
        return Settlement(
            hold_id=hold_id,
            transaction_id=transaction_id,
            charged_micros=charged,
            provider_micros=provider,
            platform_micros=platform,
            released_micros=hold.amount_micros - charged,
        )

    async def _release(self, hold_id: str, status: str, kind: str, now: datetime) -> bool:
        async with self.writing() as conn:
            hold = await self._claim_hold(conn, hold_id, status, now)
            if hold is None:
                return False
            await _post(
                conn,
                kind=kind,
                account_id=hold.account_id,
                postings=release_postings(
                    hold.account_id, hold.amount_micros, sandbox=hold.sandbox
                ),
                now=now,
                job_id=hold.job_id,
                hold_id=hold_id,
            )
        return True

    async def void(self, hold_id: str) -> bool:
        """Releases a whole hold (the job failed or never ran).

        True if this call voided it; False if it was already settled, voided or
        expired — so a cleanup path may call it unconditionally.
        """
        return await self._release(hold_id, "voided", "void", self._now())

    async def expire_holds(self, now: datetime | None = None) -> int:
        """The sweeper: releases every open hold whose expiry has passed; returns how many.

        Each hold is released in its own short transaction, so a large sweep never holds
        the write lock long; a hold settled between the scan and its release is skipped.
        """
        now = self._now(now)
        expired = 0
        while True:
            due = await self.due_holds(now)
            for hold in due:
                expired += await self.expire_hold(hold.id, now)
            if len(due) < EXPIRE_BATCH:
                return expired

    async def due_holds(self, now: datetime | None = None) -> list[DueHold]:
        """Up to ``EXPIRE_BATCH`` open holds whose expiry has passed, oldest first."""
        scan = (
            select(holds.c.id, holds.c.account_id, holds.c.sandbox, holds.c.amount_micros)
            .where(holds.c.status == "open", holds.c.expires_at <= self._now(now))
            .order_by(holds.c.expires_at)
            .limit(EXPIRE_BATCH)
        )
        async with self._engine.connect() as conn:
            rows = (await conn.execute(scan)).all()
        return [DueHold(r.id, r.account_id, bool(r.sandbox), int(r.amount_micros)) for r in rows]

    async def expire_hold(self, hold_id: str, now: datetime | None = None) -> bool:
        """Releases one expired hold; False if it was resolved in the meantime."""
        return await self._release(hold_id, "expired", "expire", self._now(now))

    async def payout(
        self, provider_account_id: str, amount_micros: int, *, memo: str | None = None
    ) -> str:
        """Pays a provider's earnings out; refuses (INSUFFICIENT_EARNINGS) beyond the balance."""
        require_micros(amount_micros)

        def short(_book: str, amount: int) -> Exception:
            return BillingError(
                f"payout of {amount} micro-dollars exceeds the provider's earnings",
                code="INSUFFICIENT_EARNINGS",
            )

        async with self.writing() as conn:
            return await _post(
                conn,
                kind="payout",
                account_id=provider_account_id,
                postings=payout_postings(provider_account_id, amount_micros),
                now=self._now(),
                on_shortfall=short,
                memo=memo,
            )

    # -- reads: one primary-key lookup per book ----------------------------------------
    async def book_balances(self, books: Iterable[str]) -> dict[str, int]:
        wanted = list(books)
        query = select(balances.c.book, balances.c.amount_micros).where(balances.c.book.in_(wanted))
        async with self._engine.connect() as conn:
            found = {book: int(amount) for book, amount in await conn.execute(query)}
        return {book: found.get(book, 0) for book in wanted}

    async def balance(self, account_id: str, *, sandbox: bool = False) -> Balance:
        """A developer's (available, held) credit in micro-dollars."""
        available = developer_book(account_id, sandbox=sandbox)
        held = holds_book(account_id, sandbox=sandbox)
        amounts = await self.book_balances([available, held])
        return Balance(amounts[available], amounts[held])

    async def provider_earnings(self, account_id: str) -> int:
        """A provider's earnings not yet paid out, in micro-dollars."""
        book = provider_book(account_id)
        return (await self.book_balances([book]))[book]
