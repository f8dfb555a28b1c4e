"""Writing charges: many settlements in one database transaction (group commit).

A finished job's charge is *settled* when its ledger transaction and its ``charges`` row
are committed; the gateway sends the answer only after that (``Billing.settle`` waits
for it). Charges queue up here and one writer commits whatever has queued while the
previous commit ran — one charge alone at low load, hundreds per transaction under
heavy load — so the database does one commit per batch, not one per request, and a
crash can never lose a charge whose answer was sent.

The charges of one account in a batch form one balanced ledger transaction (entries
summing to zero, netted per book), and each charge keeps its own ``charges`` row (the
job, its tokens and its split) pointing at it; the ``balances`` rows are updated once
per book per batch with the net of the batch's entries. Debits are guarded (``amount >= x``) as in the ledger; if a batch
fails (a guard refused, a job already charged), its charges are retried one by one so
that only the offending charge fails.

On SQLite the writer owns one connection in one thread and sends the whole batch there
in a single hop; on PostgreSQL it uses the async engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import insert, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from swarmgate.billing.ledger import (
    EXTERNAL_PREFIX,
    PLATFORM_REVENUE,
    SANDBOX_USAGE,
    Posting,
    add_to_balance,
    balanced,
    developer_book,
    holds_book,
    provider_book,
)
from swarmgate.store.db import sqlite_path, sqlite_value
from swarmgate.store.tables import balances, charges, holds, ledger_entries, ledger_transactions

log = logging.getLogger("swarmgate.billing")


@dataclass(slots=True)
class PendingCharge:
    """One settled job on its way to the database."""

    charge_id: str
    transaction_id: str
    job_id: str
    account_id: str
    key_id: str | None
    sandbox: bool
    model: str
    device_id: str | None
    provider_account_id: str | None
    prompt_tokens: int
    completion_tokens: int
    charged_micros: int
    provider_micros: int
    platform_micros: int
    created_at: datetime
    # A ledger hold (queued asynchronous jobs) this charge settles; None for a request
    # whose credit was reserved in memory.
    hold_id: str | None = None
    held_micros: int = 0
    done: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    def postings(self) -> list[Posting]:
        developer = developer_book(self.account_id, sandbox=self.sandbox)
        if self.hold_id is not None:
            # The whole hold leaves the holds book; what was not spent goes back.
            postings = [
                Posting(holds_book(self.account_id, sandbox=self.sandbox), -self.held_micros),
                Posting(developer, self.held_micros - self.charged_micros),
            ]
        else:
            postings = [Posting(developer, -self.charged_micros)]
        if self.sandbox:
            postings.append(Posting(SANDBOX_USAGE, self.charged_micros))
        elif self.provider_account_id is None:
            postings.append(Posting(PLATFORM_REVENUE, self.charged_micros))
        else:
            postings.append(Posting(provider_book(self.provider_account_id), self.provider_micros))
            postings.append(Posting(PLATFORM_REVENUE, self.platform_micros))
        return balanced(postings)


class ChargeRefused(Exception):
    """The database refused this charge (a guard or a uniqueness check)."""


TRANSACTION_COLUMNS = ("id", "kind", "account_id", "job_id", "hold_id", "created_at")
ENTRY_COLUMNS = ("transaction_id", "book", "amount_micros")
CHARGE_COLUMNS = (
    "id",
    "job_id",
    "account_id",
    "key_id",
    "sandbox",
    "model",
    "device_id",
    "provider_account_id",
    "prompt_tokens",
    "completion_tokens",
    "cost_micros",
    "provider_micros",
    "platform_micros",
    "transaction_id",
    "created_at",
)


@dataclass(slots=True)
class _Batch:
    """A batch's rows as tuples in the column orders above, and its balance changes."""

    transactions: list[tuple[Any, ...]]
    entries: list[tuple[Any, ...]]
    charge_rows: list[tuple[Any, ...]]
    claims: list[tuple[str, int]]  # (hold id, charged)
    deltas: list[tuple[str, int]]  # (book, net amount), sorted by book
    resolved_at: Any


def plan_batch(batch: list[PendingCharge], *, for_sqlite: bool = False) -> _Batch:
    """The rows and balance changes that commit ``batch``: pure, no IO.

    The charges of one account in one batch are posted as one ledger transaction whose
    entries are the net of their postings per book (it balances because each posting
    set does); every charge keeps its own ``charges`` row, pointing at that transaction.
    Under load this writes about one row per charge instead of five.

    ``for_sqlite`` stores instants and flags the way SQLAlchemy's SQLite types do (text
    and 0/1), converted once per charge: the raw DBAPI path skips per-value processing.
    """
    by_account: dict[str, list[PendingCharge]] = {}
    for charge in batch:
        by_account.setdefault(charge.account_id, []).append(charge)
    transactions: list[tuple[Any, ...]] = []
    entries: list[tuple[Any, ...]] = []
    charge_rows: list[tuple[Any, ...]] = []
    claims: list[tuple[str, int]] = []
    net: dict[str, int] = defaultdict(int)
    first = batch[0].created_at
    resolved_at: Any = sqlite_value(first) if for_sqlite else first
    for account_id, group in by_account.items():
        txn = group[0].transaction_id
        only = group[0] if len(group) == 1 else None
        transactions.append(
            (
                txn,
                "settle",
                account_id,
                only.job_id if only else None,
                only.hold_id if only else None,
                resolved_at,
            )
        )
        postings: list[Posting] = []
        for charge in group:
            charge.transaction_id = txn
            postings.extend(charge.postings())
            charge_rows.append(
                (
                    charge.charge_id,
                    charge.job_id,
                    charge.account_id,
                    charge.key_id,
                    int(charge.sandbox) if for_sqlite else charge.sandbox,
                    charge.model,
                    charge.device_id,
                    charge.provider_account_id,
                    charge.prompt_tokens,
                    charge.completion_tokens,
                    charge.charged_micros,
                    charge.provider_micros,
                    charge.platform_micros,
                    txn,
                    sqlite_value(charge.created_at) if for_sqlite else charge.created_at,
                )
            )
            if charge.hold_id is not None:
                claims.append((charge.hold_id, charge.charged_micros))
        for book, amount in balanced(postings):
            entries.append((txn, book, amount))
            net[book] += amount
    deltas = sorted((book, amount) for book, amount in net.items() if amount != 0)
    return _Batch(transactions, entries, charge_rows, claims, deltas, resolved_at)


def _guarded(book: str, amount: int) -> bool:
    return amount < 0 and not book.startswith(EXTERNAL_PREFIX)


# -- SQLite: one connection, one thread, one hop per batch -------------------------------
def _insert_sql(table: str, columns: tuple[str, ...]) -> str:
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) "  # noqa: S608 - fixed tables and columns
        f"VALUES ({', '.join('?' for _ in columns)})"
    )


_TRANSACTIONS_SQL = _insert_sql("ledger_transactions", TRANSACTION_COLUMNS)
_ENTRIES_SQL = _insert_sql("ledger_entries", ENTRY_COLUMNS)
_CHARGES_SQL = _insert_sql("charges", CHARGE_COLUMNS)


class _SqliteWriter:
    def __init__(self, path: str) -> None:
        self._path = path
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="billing-writer")
        self._conn: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=30000")
            self._conn = conn
        return self._conn

    def _commit(self, plan: _Batch) -> None:
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            for hold_id, charged in plan.claims:
                claimed = conn.execute(
                    "UPDATE holds SET status = 'settled', charged_micros = ?, resolved_at = ? "
                    "WHERE id = ? AND status = 'open'",
                    (charged, plan.resolved_at, hold_id),
                )
                if claimed.rowcount != 1:
                    raise ChargeRefused(f"hold {hold_id} is no longer open")
            for book, amount in plan.deltas:
                if _guarded(book, amount):
                    moved = conn.execute(
                        "UPDATE balances SET amount_micros = amount_micros + ? "
                        "WHERE book = ? AND amount_micros >= ?",
                        (amount, book, -amount),
                    )
                    if moved.rowcount != 1:
                        raise ChargeRefused(f"{book} cannot cover {-amount} micros")
                else:
                    conn.execute(
                        "INSERT INTO balances (book, amount_micros) VALUES (?, ?) "
                        "ON CONFLICT (book) DO UPDATE SET amount_micros = amount_micros + excluded.amount_micros",
                        (book, amount),
                    )
            conn.executemany(_TRANSACTIONS_SQL, plan.transactions)
            if plan.entries:
                conn.executemany(_ENTRIES_SQL, plan.entries)
            conn.executemany(_CHARGES_SQL, plan.charge_rows)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    for_sqlite = True

    async def commit(self, plan: _Batch) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._pool, self._commit, plan)
        except sqlite3.IntegrityError as exc:
            raise ChargeRefused(str(exc)) from exc

    def close(self) -> None:
        def close_connection() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        self._pool.submit(close_connection).result()
        self._pool.shutdown(wait=True)


# -- any other database (and single charges inside a caller's transaction) --------------
async def post_plan(conn: AsyncConnection, plan: _Batch) -> None:
    """Writes a planned batch inside the caller's transaction; raises ChargeRefused."""
    try:
        for hold_id, charged in plan.claims:
            claimed = await conn.execute(
                update(holds)
                .where(holds.c.id == hold_id, holds.c.status == "open")
                .values(status="settled", charged_micros=charged, resolved_at=plan.resolved_at)
            )
            if claimed.rowcount != 1:
                raise ChargeRefused(f"hold {hold_id} is no longer open")
        for book, amount in plan.deltas:  # sorted: one lock order everywhere
            if _guarded(book, amount):
                moved = await conn.execute(
                    update(balances)
                    .where(balances.c.book == book, balances.c.amount_micros >= -amount)
                    .values(amount_micros=balances.c.amount_micros + amount)
                )
                if moved.rowcount != 1:
                    raise ChargeRefused(f"{book} cannot cover {-amount} micros")
            else:
                await conn.execute(add_to_balance(conn.dialect.name, book, amount))
        for table, columns, rows in (
            (ledger_transactions, TRANSACTION_COLUMNS, plan.transactions),
            (ledger_entries, ENTRY_COLUMNS, plan.entries),
            (charges, CHARGE_COLUMNS, plan.charge_rows),
        ):
            if rows:
                await conn.execute(
                    insert(table), [dict(zip(columns, row, strict=True)) for row in rows]
                )
    except IntegrityError as exc:
        raise ChargeRefused(str(exc.orig)) from exc


class _EngineWriter:
    for_sqlite = False

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def commit(self, plan: _Batch) -> None:
        async with self._engine.begin() as conn:
            await post_plan(conn, plan)

    def close(self) -> None:
        return None


class SettlementWriter:
    """Commits queued charges in batches; ``submit`` returns a future set on commit."""

    def __init__(self, engine: AsyncEngine, *, batch_max: int = 512) -> None:
        path = sqlite_path(engine)
        self._writer: _SqliteWriter | _EngineWriter = (
            _SqliteWriter(path)
            if path is not None and path != ":memory:"
            else _EngineWriter(engine)
        )
        self._batch_max = batch_max
        self._queue: list[PendingCharge] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.batches = 0  # commits so far (for benchmarks and tests)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="settlement-writer")

    def submit(self, charge: PendingCharge) -> asyncio.Future[None]:
        if self._task is None or self._task.done():
            charge.done.set_exception(ChargeRefused("the settlement writer is not running"))
            return charge.done
        self._queue.append(charge)
        self._wake.set()
        return charge.done

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch = self._queue[: self._batch_max]
                del self._queue[: self._batch_max]
                await self._commit(batch)
            if self._stopping:
                return

    async def _commit(self, batch: list[PendingCharge]) -> None:
        try:
            await self._writer.commit(plan_batch(batch, for_sqlite=self._writer.for_sqlite))
        except ChargeRefused:
            if len(batch) == 1:
                _fail(batch[0], "refused")
                return
            for charge in batch:  # find the offender; commit the rest one by one
                await self._commit([charge])
            return
        except Exception:
            log.exception("committing %d charge(s) failed", len(batch))
            for charge in batch:
                _fail(charge, "database error")
            return
        self.batches += 1
        for charge in batch:
            if not charge.done.done():
                charge.done.set_result(None)

    async def stop(self) -> None:
        """Commits everything already queued, then stops."""
        if self._task is not None:
            self._stopping = True
            self._wake.set()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._queue:  # submitted after the writer stopped
            batch = self._queue[: self._batch_max]
            del self._queue[: self._batch_max]
            await self._commit(batch)
        self._writer.close()


def _fail(charge: PendingCharge, why: str) -> None:
    log.error("a charge was not written (%s)", why, extra={"job_id": charge.job_id})
    if not charge.done.done():
        charge.done.set_exception(ChargeRefused(why))
