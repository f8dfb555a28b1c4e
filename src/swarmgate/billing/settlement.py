"""Writing charges: settled before the answer leaves, posted to the ledger in bulk.

A finished job's charge is *settled* once it is durable; the gateway sends the answer
only after that (``Billing.settle`` waits for it), so a crash can never lose a charge
whose answer was sent. Charges queue up here and one writer makes durable whatever has
queued while its previous write ran — one charge alone at low load, hundreds together
under heavy load — so the database commits once per group, not once per request.

On SQLite (the embedded default) a small group is first appended to ``charge_journal``,
one small row per charge, and posted to the ledger (transactions, entries, ``charges``
rows, balances) every few milliseconds in one transaction that also empties the journal;
a restart posts whatever a crashed process left there before serving. A commit that
touches one table instead of five costs a tenth as much (BENCHMARKS.md) — for one
charge. A large group (``DIRECT_POST_MIN`` charges and more, under heavy load) is posted
to the ledger at once instead: per charge that costs less than appending it and posting
it later, and it is as durable. On other databases each group is posted directly.

The charges of one account in a posted group form one balanced ledger transaction
(entries summing to zero, netted per book), and each charge keeps its own ``charges``
row (the job, its tokens and its split) pointing at it; ``balances`` rows are updated
once per book per group with the net of its entries. Debits are guarded
(``amount >= x``) as in the ledger; a group that fails is retried one charge at a time
so that only the offending charge fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from queue import Empty, SimpleQueue
from typing import Any

import orjson
from sqlalchemy import insert, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from swarmgate.accounts.keys import new_id
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
from swarmgate.store.db import apply_sqlite_pragmas, sqlite_path, sqlite_value
from swarmgate.store.tables import balances, charges, holds, ledger_entries, ledger_transactions

log = logging.getLogger("swarmgate.billing")


@dataclass(slots=True)
class PendingCharge:
    """One settled job on its way to the database."""

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
    # Set when the charge is durable; None for a charge read back from the journal.
    done: asyncio.Future[None] | None = None

    def to_json(self) -> str:
        """The journal's record of a charge settled against an in-memory hold."""
        if self.hold_id is not None:
            raise ValueError("charges against ledger holds are posted directly, not journaled")
        return orjson.dumps(
            {name: getattr(self, name) for name in _JOURNALED}
            | {"created_at": self.created_at.isoformat()}
        ).decode()

    @classmethod
    def from_json(cls, body: str) -> PendingCharge:
        fields = orjson.loads(body)
        fields["created_at"] = datetime.fromisoformat(fields["created_at"])
        return cls(**fields)

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


_JOURNALED = (
    "job_id",
    "account_id",
    "key_id",
    "sandbox",
    "model",
    "device_id",
    "provider_account_id",
    "prompt_tokens",
    "completion_tokens",
    "charged_micros",
    "provider_micros",
    "platform_micros",
)


class ChargeRefused(Exception):
    """The database refused this charge (a guard or a uniqueness check)."""


TRANSACTION_COLUMNS = ("id", "kind", "account_id", "job_id", "hold_id", "created_at")
ENTRY_COLUMNS = ("transaction_id", "book", "amount_micros")
CHARGE_COLUMNS = (
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

    The charges of one account in one batch (but those settling a ledger hold, which get
    one each) are posted as one ledger transaction whose
    entries are the net of their postings per book (it balances because each posting
    set does); every charge keeps its own ``charges`` row, pointing at that transaction.
    Under load this writes about one row per charge instead of five.

    ``for_sqlite`` stores instants and flags the way SQLAlchemy's SQLite types do (text
    and 0/1), converted once per charge: the raw DBAPI path skips per-value processing.
    """
    by_account: dict[tuple[str, str | None], list[PendingCharge]] = {}
    for charge in batch:
        # A charge that settles a ledger hold keeps a transaction of its own, which names
        # the hold: every hold has exactly one resolving transaction.
        by_account.setdefault((charge.account_id, charge.hold_id), []).append(charge)
    transactions: list[tuple[Any, ...]] = []
    entries: list[tuple[Any, ...]] = []
    charge_rows: list[tuple[Any, ...]] = []
    claims: list[tuple[str, int]] = []
    net: dict[str, int] = defaultdict(int)
    first = batch[0].created_at
    resolved_at: Any = sqlite_value(first) if for_sqlite else first
    for (account_id, _hold_id), group in by_account.items():
        txn = new_id("txn")
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
            postings.extend(charge.postings())
            charge_rows.append(
                (
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


@dataclass(slots=True)
class _Call:
    """Work other than charges for the writer thread (a read, posting, closing), run in
    order with the charges submitted before it."""

    fn: Callable[[], Any]
    future: asyncio.Future[Any]


# What the thread hands back: (the future to resolve, the error or None, the result).
_Outcome = tuple["asyncio.Future[Any] | None", BaseException | None, Any]


class _SqliteJournal:
    """Charges on SQLite, in two steps, in one thread of its own with one connection.

    1. *append*: each charge is written as one row of ``charge_journal`` and committed —
       one small insert, so one short commit per group of waiting requests. Once that
       returns, the charge is settled: it survives a crash and will be posted.
    2. *post*: every ``post_interval_s`` (and at start, for what a crashed process left),
       journaled charges are posted to the ledger — transactions, entries, ``charges`` rows
       and balances — in transactions that also delete them from the journal, one slice at
       a time between groups, so a charge waiting to be written waits for one slice at most.

    Group commit: the charges submitted during one step of the event loop reach the thread
    together (one wake-up), and the thread writes everything that queued while it was busy
    as one group; a group of ``DIRECT_POST_MIN`` charges or more is posted at once instead
    of journaled. The futures of everything written are resolved by one call into the
    event loop. Posting takes no step of the event loop at all.

    Between the two steps a developer book in ``balances`` does not yet show its
    journaled charges; ``developer_balance`` subtracts them, read in the same thread, so
    the request path never sees credit that is already spent.
    """

    def __init__(self, path: str, *, batch_max: int, post_interval_s: float) -> None:
        self._path = path
        self._batch_max = batch_max
        self._post_interval_s = post_interval_s
        # Only touched in the thread: the connection, developer book → journaled charges
        # not yet posted, and how many rows this process journaled and has not posted.
        self._conn: sqlite3.Connection | None = None
        self._unposted: dict[str, int] = defaultdict(int)
        self._journaled = 0
        self._closing = False
        self.groups = 0  # groups written (for benchmarks and tests)
        # Only touched in the event loop: the charges submitted in its current step.
        self._pending: list[PendingCharge] = []
        self._queue: SimpleQueue[list[PendingCharge] | _Call] = SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- the event loop's side --------------------------------------------------------------
    def _started(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._serve, name="billing-writer", daemon=True)
            self._thread.start()
        return self._loop

    def submit(self, charge: PendingCharge) -> None:
        """Queues ``charge``; the thread resolves ``charge.done`` once it is durable."""
        loop = self._started()
        if not self._pending:
            loop.call_soon(self._hand_over)
        self._pending.append(charge)

    def _hand_over(self) -> None:
        if self._pending:
            batch, self._pending = self._pending, []
            self._queue.put(batch)

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        future = self._started().create_future()
        self._hand_over()  # charges submitted before are written first
        self._queue.put(_Call(functools.partial(fn, *args), future))
        return await future

    async def post_all(self) -> int:
        """Posts everything journaled; returns how many charges that was."""
        return int(await self._call(self._post_all))

    async def developer_balance(self, book: str) -> int:
        return int(await self._call(self._developer_balance, book))

    async def close(self) -> None:
        """Writes what was submitted, posts everything, closes; the thread then ends."""
        if self._thread is None:
            return
        await self._call(self._close)
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        self._loop = self._thread = None

    @staticmethod
    def _resolve(outcomes: list[_Outcome]) -> None:
        for future, error, result in outcomes:
            if future is None or future.done():
                continue  # its waiter was cancelled; the charge is written all the same
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

    # -- the thread -------------------------------------------------------------------------
    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            apply_sqlite_pragmas(conn)
            self._conn = conn
        return self._conn

    def _serve(self) -> None:
        loop = self._loop
        assert loop is not None
        # Woken by the event loop, this thread needs the GIL the loop still holds: as a
        # batch thread (Linux) it waits for the loop to go idle instead of preempting it,
        # which saved two context switches a request at low load (BENCHMARKS.md).
        with contextlib.suppress(AttributeError, OSError):
            os.sched_setscheduler(threading.get_native_id(), os.SCHED_BATCH, os.sched_param(0))
        last_post = time.monotonic()
        due = False  # journaled charges are waiting to be posted: a slice after each group
        while not self._closing:
            timeout: float | None = None  # wait for work
            if due:
                timeout = 0.0
            elif self._journaled:
                timeout = last_post + self._post_interval_s - time.monotonic()
                if timeout <= 0:
                    due, timeout = True, 0.0
            items: list[list[PendingCharge] | _Call] = []
            with contextlib.suppress(Empty):
                if timeout is None:
                    items.append(self._queue.get())
                elif timeout > 0:
                    items.append(self._queue.get(timeout=timeout))
                else:
                    items.append(self._queue.get_nowait())
            if items:
                with contextlib.suppress(Empty):
                    while True:
                        items.append(self._queue.get_nowait())
                outcomes = self._work(items)
                try:
                    loop.call_soon_threadsafe(self._resolve, outcomes)
                except RuntimeError:  # the event loop is closed: nobody is waiting
                    return
            if due and not self._closing:
                try:
                    self._post(POST_SLICE)
                except Exception:
                    log.exception("posting journaled charges failed; will retry")
                    self._journaled = 0  # try again when the next charge is journaled
                if not self._journaled:
                    due, last_post = False, time.monotonic()

    def _work(self, items: list[list[PendingCharge] | _Call]) -> list[_Outcome]:
        """Writes the charges and runs the calls in ``items``, in order."""
        outcomes: list[_Outcome] = []
        group: list[PendingCharge] = []
        for item in items:
            if isinstance(item, list):
                group.extend(item)
                continue
            self._write(group, outcomes)
            group = []
            try:
                outcomes.append((item.future, None, item.fn()))
            except Exception as exc:
                outcomes.append((item.future, exc, None))
        self._write(group, outcomes)
        return outcomes

    def _write(self, group: list[PendingCharge], outcomes: list[_Outcome]) -> None:
        for start in range(0, len(group), self._batch_max):
            for charge, error in self._write_batch(group[start : start + self._batch_max]):
                outcomes.append((charge.done, error, None))

    def _write_batch(
        self,
        batch: list[PendingCharge],
        write: Callable[[list[PendingCharge]], None] | None = None,
    ) -> list[tuple[PendingCharge, ChargeRefused | None]]:
        write = write or (self._post_now if len(batch) >= DIRECT_POST_MIN else self._append)
        try:
            write(batch)
        except (ChargeRefused, sqlite3.IntegrityError):
            if len(batch) == 1:
                return [(batch[0], _refused(batch[0], "refused"))]
            # Find the offender (its answer is withheld, unpaid); write the rest one by one.
            return [done for charge in batch for done in self._write_batch([charge], write)]
        except Exception:
            log.exception("writing %d charge(s) failed", len(batch))
            return [(charge, _refused(charge, "database error")) for charge in batch]
        self.groups += 1
        return [(charge, None) for charge in batch]

    # -- step 1 --------------------------------------------------------------------------
    def _append(self, batch: list[PendingCharge]) -> None:
        conn = self._connection()
        rows = [(charge.to_json(),) for charge in batch]
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany("INSERT INTO charge_journal (body) VALUES (?)", rows)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        for charge in batch:
            book = developer_book(charge.account_id, sandbox=charge.sandbox)
            self._unposted[book] += charge.charged_micros
        self._journaled += len(batch)

    # -- or both at once ---------------------------------------------------------------------
    def _post_now(self, batch: list[PendingCharge]) -> None:
        """Posts ``batch`` to the ledger in one transaction, past the journal; raises
        ChargeRefused or IntegrityError, nothing written, if the ledger refuses any of it."""
        conn = self._connection()
        plan = plan_batch(batch, for_sqlite=True)
        conn.execute("BEGIN IMMEDIATE")
        try:
            _write_plan(conn, plan)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    # -- step 2 --------------------------------------------------------------------------
    def _post_rows(self, rows: list[tuple[int, PendingCharge]]) -> None:
        conn = self._connection()
        plan = plan_batch([charge for _, charge in rows], for_sqlite=True)
        conn.execute("BEGIN IMMEDIATE")
        try:
            _write_plan(conn, plan)
            conn.executemany("DELETE FROM charge_journal WHERE seq = ?", [(s,) for s, _ in rows])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        for _, charge in rows:
            book = developer_book(charge.account_id, sandbox=charge.sandbox)
            self._unposted[book] -= charge.charged_micros

    def _post(self, limit: int) -> int:
        """Posts up to ``limit`` journaled charges; returns how many it read."""
        conn = self._connection()
        found = conn.execute(
            "SELECT seq, body FROM charge_journal WHERE failed_at IS NULL ORDER BY seq LIMIT ?",
            (limit,),
        ).fetchall()
        rows = [(int(seq), PendingCharge.from_json(body)) for seq, body in found]
        # Fewer than asked for: nothing else is waiting.
        self._journaled = max(0, self._journaled - len(rows)) if len(rows) == limit else 0
        if not rows:
            return 0
        try:
            self._post_rows(rows)
        except (ChargeRefused, sqlite3.IntegrityError):
            for row in rows:  # find the offender; post the rest one by one
                try:
                    self._post_rows([row])
                except (ChargeRefused, sqlite3.IntegrityError) as exc:
                    # Settled and answered, but the ledger refuses it (a book changed
                    # outside the gateway, or a job charged twice): kept for an operator.
                    log.error(
                        "a journaled charge cannot be posted: %s",
                        exc,
                        extra={"job_id": row[1].job_id},
                    )
                    conn.execute(
                        "UPDATE charge_journal SET failed_at = ?, error = ? WHERE seq = ?",
                        (sqlite_value(datetime.now(UTC)), str(exc)[:500], row[0]),
                    )
        return len(rows)

    def _post_all(self) -> int:
        posted = 0
        while True:
            n = self._post(self._batch_max)
            posted += n
            if n < self._batch_max:
                return posted

    # -- reads, and closing -------------------------------------------------------------------
    def _developer_balance(self, book: str) -> int:
        found = (
            self._connection()
            .execute("SELECT amount_micros FROM balances WHERE book = ?", (book,))
            .fetchone()
        )
        return (int(found[0]) if found else 0) - self._unposted.get(book, 0)

    def _close(self) -> None:
        try:
            self._post_all()
        finally:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            self._closing = True


def _write_plan(conn: sqlite3.Connection, plan: _Batch) -> None:
    """A planned batch on a raw SQLite connection, inside the caller's transaction."""
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
                "INSERT INTO balances (book, amount_micros) VALUES (?, ?) ON CONFLICT (book) "
                "DO UPDATE SET amount_micros = amount_micros + excluded.amount_micros",
                (book, amount),
            )
    conn.executemany(_TRANSACTIONS_SQL, plan.transactions)
    if plan.entries:
        conn.executemany(_ENTRIES_SQL, plan.entries)
    conn.executemany(_CHARGES_SQL, plan.charge_rows)


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


# -- PostgreSQL: prepared statements on the driver's own connection ------------------------
def _pg_insert_sql(table: str, columns: tuple[str, ...]) -> str:
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) "  # noqa: S608 - fixed tables and columns
        f"VALUES ({', '.join(f'${n}' for n in range(1, len(columns) + 1))})"
    )


_PG_INSERTS = (
    _pg_insert_sql("ledger_transactions", TRANSACTION_COLUMNS),
    _pg_insert_sql("ledger_entries", ENTRY_COLUMNS),
    _pg_insert_sql("charges", CHARGE_COLUMNS),
)
_PG_CLAIM = (
    "UPDATE holds SET status = 'settled', charged_micros = $1, resolved_at = $2 "
    "WHERE id = $3 AND status = 'open'"
)
_PG_DEBIT = (
    "UPDATE balances SET amount_micros = amount_micros + $1::bigint "
    "WHERE book = $2 AND amount_micros >= -($1::bigint)"
)
_PG_CREDIT = (
    "INSERT INTO balances (book, amount_micros) VALUES ($1, $2) ON CONFLICT (book) "
    "DO UPDATE SET amount_micros = balances.amount_micros + EXCLUDED.amount_micros"
)


class _PostgresWriter:
    """PostgreSQL: a batch posted in one transaction of prepared statements on asyncpg's
    own connection (SQLAlchemy's statement building costs more than the database here)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def commit(self, batch: list[PendingCharge]) -> None:
        import asyncpg  # type: ignore[import-untyped]

        plan = plan_batch(batch)
        async with self._engine.connect() as conn:
            raw = await conn.get_raw_connection()
            driver: Any = raw.driver_connection
            try:
                async with driver.transaction():
                    # Rows nobody else touches first; the shared balance rows (the
                    # platform's, a provider's, a developer's) last, so their locks are
                    # held for as short a time as the transaction allows.
                    for sql, rows in zip(
                        _PG_INSERTS,
                        (plan.transactions, plan.entries, plan.charge_rows),
                        strict=True,
                    ):
                        if rows:
                            await driver.executemany(sql, rows)
                    for hold_id, charged in plan.claims:
                        status = await driver.execute(_PG_CLAIM, charged, plan.resolved_at, hold_id)
                        if status != "UPDATE 1":
                            raise ChargeRefused(f"hold {hold_id} is no longer open")
                    for book, amount in plan.deltas:  # sorted: one lock order everywhere
                        if _guarded(book, amount):
                            if await driver.execute(_PG_DEBIT, amount, book) != "UPDATE 1":
                                raise ChargeRefused(f"{book} cannot cover {-amount} micros")
                        else:
                            await driver.execute(_PG_CREDIT, book, amount)
            except asyncpg.IntegrityConstraintViolationError as exc:
                raise ChargeRefused(str(exc)) from exc

    def close(self) -> None:
        return None


class _EngineWriter:
    """Any other database: each group of charges is posted to the ledger directly."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def commit(self, batch: list[PendingCharge]) -> None:
        async with self._engine.begin() as conn:
            await post_plan(conn, plan_batch(batch))

    def close(self) -> None:
        return None


# Charges per posting transaction in the background: small enough that an append queued
# behind one waits a few hundred microseconds, large enough to amortise the commit.
POST_SLICE = 32
# A group of this many charges or more skips the journal and is posted at once.
DIRECT_POST_MIN = 16


class SettlementWriter:
    """Commits queued charges in groups; ``submit`` returns a future set once durable."""

    def __init__(
        self, engine: AsyncEngine, *, batch_max: int = 512, post_interval_s: float = 0.05
    ) -> None:
        path = sqlite_path(engine)
        self._journal = (
            _SqliteJournal(path, batch_max=batch_max, post_interval_s=post_interval_s)
            if path is not None and path != ":memory:"
            else None
        )
        self._direct: _EngineWriter | _PostgresWriter | None = None
        if self._journal is None:
            postgres = engine.dialect.name == "postgresql"
            self._direct = _PostgresWriter(engine) if postgres else _EngineWriter(engine)
        self._batch_max = batch_max
        self._queue: list[PendingCharge] = []  # for a database other than SQLite
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._running = False
        self._batches = 0

    @property
    def batches(self) -> int:
        """Durable commits so far (for benchmarks and tests)."""
        return self._journal.groups if self._journal is not None else self._batches

    async def recover(self) -> int:
        """Posts what a previous process journaled but did not post; call before serving."""
        if self._journal is None:
            return 0
        recovered = await self._journal.post_all()
        if recovered:
            log.info("posted %d charge(s) journaled before a restart", recovered)
        return recovered

    def start(self) -> None:
        self._running = True
        if self._journal is None:
            self._task = asyncio.create_task(self._run(), name="settlement-writer")

    def submit(self, charge: PendingCharge) -> asyncio.Future[None]:
        done = asyncio.get_running_loop().create_future()
        charge.done = done
        if not self._running or (self._task is not None and self._task.done()):
            done.set_exception(ChargeRefused("the settlement writer is not running"))
        elif self._journal is not None:
            self._journal.submit(charge)
        else:
            self._queue.append(charge)
            self._wake.set()
        return done

    async def posted(self) -> None:
        """Posts every journaled charge now: for readers of ``charges`` and ``balances``
        that must see the latest answers (usage, earnings)."""
        if self._journal is not None:
            await self._journal.post_all()

    async def developer_balance(self, book: str) -> int | None:
        """A developer book's balance net of charges not yet posted (None: read the
        ledger, nothing is pending outside it)."""
        if self._journal is None:
            return None
        return await self._journal.developer_balance(book)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch = self._queue[: self._batch_max]
                del self._queue[: self._batch_max]
                await self._commit(batch)
            if not self._running:
                return

    async def _commit(self, batch: list[PendingCharge]) -> None:
        assert self._direct is not None
        try:
            await self._direct.commit(batch)
        except ChargeRefused:
            if len(batch) == 1:
                _fail(batch[0], "refused")
                return
            # Find the offender (its answer is withheld, unpaid); write the rest one by one.
            for charge in batch:
                await self._commit([charge])
            return
        except Exception:
            log.exception("writing %d charge(s) failed", len(batch))
            for charge in batch:
                _fail(charge, "database error")
            return
        self._batches += 1
        for charge in batch:
            if charge.done is not None and not charge.done.done():
                charge.done.set_result(None)

    async def stop(self) -> None:
        """Makes everything already submitted durable and posted, then stops."""
        self._running = False
        if self._journal is not None:
            await self._journal.close()
            return
        if self._task is not None:
            self._wake.set()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._queue:  # submitted before the writer stopped, not yet written
            batch = self._queue[: self._batch_max]
            del self._queue[: self._batch_max]
            await self._commit(batch)


def _refused(charge: PendingCharge, why: str) -> ChargeRefused:
    log.error("a charge was not written (%s)", why, extra={"job_id": charge.job_id})
    return ChargeRefused(why)


def _fail(charge: PendingCharge, why: str) -> None:
    error = _refused(charge, why)
    if charge.done is not None and not charge.done.done():
        charge.done.set_exception(error)
