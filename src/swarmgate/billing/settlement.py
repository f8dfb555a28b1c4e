"""Writing charges: settled before the answer leaves, posted to the ledger in bulk.

A finished job's charge is *settled* once it is durable; the gateway sends the answer
only after that (``Billing.settle`` waits for it), so a crash can never lose a charge
whose answer was sent.

On SQLite (the embedded default) a charge is appended to a journal file with one write
as it is submitted, which settles it; a thread posts the journal to the ledger
(transactions, entries, ``charges`` rows, balances) every few milliseconds, many charges
to a transaction, and a restart posts whatever a crashed process left in the journal
before serving. The request waits for a write to the page cache, not for a database
commit in another thread (BENCHMARKS.md). On other databases charges queue up and one
writer commits whatever queued while its previous commit ran — one charge alone at low
load, hundreds together under heavy load — posted directly, one transaction per group.

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
import sys
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
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
from swarmgate.store.db import SqliteInstants, apply_sqlite_pragmas, sqlite_path, sqlite_value
from swarmgate.store.tables import balances, charges, holds, ledger_entries, ledger_transactions

if sys.platform != "win32":
    import fcntl

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
        return self.journal_record().decode().rstrip("\n")

    def journal_record(self) -> bytes:
        """``to_json`` as one line of the journal file."""
        if self.hold_id is not None:
            raise ValueError("charges against ledger holds are posted directly, not journaled")
        # A dict display, not a comprehension over the names: this runs on every request.
        return orjson.dumps(
            {
                "job_id": self.job_id,
                "account_id": self.account_id,
                "key_id": self.key_id,
                "sandbox": self.sandbox,
                "model": self.model,
                "device_id": self.device_id,
                "provider_account_id": self.provider_account_id,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "charged_micros": self.charged_micros,
                "provider_micros": self.provider_micros,
                "platform_micros": self.platform_micros,
                "created_at": self.created_at,  # orjson writes it as RFC 3339
            },
            option=orjson.OPT_APPEND_NEWLINE,
        )

    @classmethod
    def from_json(cls, body: str | bytes) -> PendingCharge:
        fields = orjson.loads(body)
        fields["created_at"] = datetime.fromisoformat(fields["created_at"])
        return cls(**fields)

    def postings(self) -> list[Posting]:
        """The ledger postings of this charge, balanced."""
        moved: dict[str, int] = {}
        self.add_postings(moved)
        return balanced(Posting(book, amount) for book, amount in moved.items())

    def add_postings(self, moved: dict[str, int]) -> None:
        """Adds this charge's postings to ``moved`` (book → amount): what a batch nets
        per transaction, without a Posting object per charge."""
        add_postings(
            moved,
            self.account_id,
            self.sandbox,
            self.provider_account_id,
            self.charged_micros,
            self.provider_micros,
            self.platform_micros,
            self.hold_id,
            self.held_micros,
        )


def add_postings(
    moved: dict[str, int],
    account_id: str,
    sandbox: bool,
    provider_account_id: str | None,
    charged: int,
    provider_micros: int,
    platform_micros: int,
    hold_id: str | None = None,
    held: int = 0,
) -> None:
    """Adds to ``moved`` (book → amount) the postings of a charge — or of several charges
    of one account, sandbox flag and provider, summed: the postings are linear in the
    amounts, so their sum nets to what the charges' own postings net to."""
    developer = developer_book(account_id, sandbox=sandbox)
    if hold_id is not None:
        # The whole hold leaves the holds book; what was not spent goes back.
        book = holds_book(account_id, sandbox=sandbox)
        moved[book] = moved.get(book, 0) - held
        moved[developer] = moved.get(developer, 0) + held - charged
    else:
        moved[developer] = moved.get(developer, 0) - charged
    if sandbox:
        moved[SANDBOX_USAGE] = moved.get(SANDBOX_USAGE, 0) + charged
    elif provider_account_id is None:
        moved[PLATFORM_REVENUE] = moved.get(PLATFORM_REVENUE, 0) + charged
    else:
        provider = provider_book(provider_account_id)
        moved[provider] = moved.get(provider, 0) + provider_micros
        moved[PLATFORM_REVENUE] = moved.get(PLATFORM_REVENUE, 0) + platform_micros


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
    instant = SqliteInstants() if for_sqlite else None
    resolved_at: Any = first if instant is None else instant(first)
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
        moved: dict[str, int] = {}
        # (sandbox, provider) → [charged, provider's, platform's]: summed per charge, the
        # postings made once per sum (``add_postings``), not once per charge.
        sums: dict[tuple[bool, str | None], list[int]] = {}
        for charge in group:
            if charge.hold_id is not None:
                charge.add_postings(moved)
            else:
                total = sums.get((charge.sandbox, charge.provider_account_id))
                if total is None:
                    sums[charge.sandbox, charge.provider_account_id] = [
                        charge.charged_micros,
                        charge.provider_micros,
                        charge.platform_micros,
                    ]
                else:
                    total[0] += charge.charged_micros
                    total[1] += charge.provider_micros
                    total[2] += charge.platform_micros
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
                    charge.created_at if instant is None else instant(charge.created_at),
                )
            )
            if charge.hold_id is not None:
                claims.append((charge.hold_id, charge.charged_micros))
        for (sandbox, provider_id), (charged, provider, platform) in sums.items():
            add_postings(moved, account_id, sandbox, provider_id, charged, provider, platform)
        for book, amount in balanced(Posting(book, amount) for book, amount in moved.items()):
            entries.append((txn, book, amount))
            net[book] += amount
    deltas = sorted((book, amount) for book, amount in net.items() if amount != 0)
    return _Batch(transactions, entries, charge_rows, claims, deltas, resolved_at)


def _guarded(book: str, amount: int) -> bool:
    return amount < 0 and not book.startswith(EXTERNAL_PREFIX)


# -- SQLite: a journal file written from the event loop, posted by a thread --------------
def _insert_sql(table: str, columns: tuple[str, ...]) -> str:
    return (
        f"INSERT INTO {table} ({', '.join(columns)}) "  # noqa: S608 - fixed tables and columns
        f"VALUES ({', '.join('?' for _ in columns)})"
    )


_TRANSACTIONS_SQL = _insert_sql("ledger_transactions", TRANSACTION_COLUMNS)
_ENTRIES_SQL = _insert_sql("ledger_entries", ENTRY_COLUMNS)
_CHARGES_SQL = _insert_sql("charges", CHARGE_COLUMNS)

# Past this size a journal segment is closed and the next one begun; the writer thread
# deletes a closed segment once every charge in it is posted.
SEGMENT_BYTES = 4 << 20


def _lock(fd: int, *, wait: bool) -> bool:
    """Takes the segment's exclusive lock; False if another process holds it."""
    if sys.platform == "win32":  # no flock: one gateway process per database there
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


@dataclass(slots=True)
class _Segment:
    """One file of the charge journal: one JSON line per charge. The process that writes
    it holds its lock until every charge in it is posted and the file deleted, so another
    process's recovery takes only the segments of processes that are gone."""

    path: Path
    fd: int
    size: int = 0

    @classmethod
    def create(cls, directory: Path) -> _Segment:
        path = directory / f"{time.time_ns():020d}-{os.getpid()}.log"
        # os.open's descriptors are not inherited by child processes (PEP 446).
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        _lock(fd, wait=True)
        return cls(path, fd)

    def append(self, data: bytes) -> None:
        """Appends all of ``data``, or raises OSError leaving none of it in the file."""
        try:
            written = os.write(self.fd, data)
            while written < len(data):  # a short write (a signal, a disk filling): the rest
                written += os.write(self.fd, data[written:])
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.size)
            raise
        self.size += written

    def remove(self) -> None:
        """Every charge in it is posted: deletes the file, then gives up its lock."""
        self.path.unlink(missing_ok=True)
        os.close(self.fd)


@dataclass(slots=True)
class _Call:
    """Work other than charges for the writer thread (a read, posting, closing), run after
    the charges written before it are taken."""

    fn: Callable[[], Any]
    future: asyncio.Future[Any]


# What the thread hands back: (the future to resolve, the error or None, the result).
_Outcome = tuple["asyncio.Future[Any] | None", BaseException | None, Any]


class _SqliteJournal:
    """Charges on SQLite, in two steps.

    1. *append*, on the event loop: ``submit`` writes the charge to the journal, a file of
       JSON lines, with one ``os.write``; once it returns the charge is settled and its
       future resolved, so the request waiting for it does not even give up its step of
       the loop. The write goes to the page cache, a few microseconds (BENCHMARKS.md): no
       thread hop and no wake-up stand between a request and its answer. As with SQLite's own WAL under ``synchronous=NORMAL``, a
       settled charge survives a crash of the process, not a power cut. (Redis appends
       its AOF from its event loop the same way.)
    2. *post*, in a thread of its own with the one SQLite connection: every
       ``post_interval_s`` the charges written since are posted to the ledger —
       transactions, entries, ``charges`` rows and balances — ``batch_max`` to a
       transaction, and a journal segment whose charges are all posted is deleted. The
       thread takes the charges from a deque without being woken for each; the loop wakes
       it only when it has gone idle, and for reads and calls (``developer_balance``,
       ``post_all``, a charge that settles a ledger hold).

    A restart posts what a crashed process left in the journal, skipping any charge whose
    posting committed before the crash. A charge the ledger refuses at posting (a book
    changed outside the gateway, a job charged twice) is kept in ``charge_journal`` with
    ``failed_at`` for an operator; its answer was already sent.

    Between the two steps a developer book in ``balances`` does not yet show the charges
    written but not posted; ``developer_balance`` subtracts them, read in the thread after
    taking every charge written before the call, so the request path never sees credit
    that is already spent.
    """

    def __init__(self, path: str, *, batch_max: int, post_interval_s: float) -> None:
        self._path = path
        self._directory = Path(f"{path}-charges")
        self._batch_max = batch_max
        self._post_interval_s = post_interval_s
        # The event loop's: the segment it appends to.
        self._segment: _Segment | None = None
        self.groups = 0  # writes (for benchmarks and tests)
        # Between the two: what the loop wrote (charges, then closed segments), in order,
        # taken by the thread whenever it posts; and the work that must wake it (None:
        # only a wake-up). ``_idle``: the thread waits for work and must be woken.
        self._written: deque[PendingCharge | _Segment] = deque()
        self._queue: SimpleQueue[_Call | None] = SimpleQueue()
        self._idle = False
        # The thread's: the connection, what it took and has not posted (in order), and
        # (account, sandbox) → those charges' total (the developer book they left).
        self._conn: sqlite3.Connection | None = None
        self._backlog: list[PendingCharge | _Segment] = []
        self._unposted: dict[tuple[str, bool], int] = defaultdict(int)
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- the event loop's side --------------------------------------------------------------
    def _started(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._directory.mkdir(parents=True, exist_ok=True)
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._serve, name="billing-writer", daemon=True)
            self._thread.start()
        return self._loop

    def submit(self, charge: PendingCharge) -> None:
        """Settles ``charge``: appended before this returns, ``charge.done`` resolved;
        a charge that settles a ledger hold is posted by the thread, then resolved."""
        if charge.hold_id is not None:
            # It settles a hold in the ledger (a queued job): posted at once by the thread.
            assert charge.done is not None
            self._started()
            self._queue.put(_Call(functools.partial(self._post_held, charge), charge.done))
            return
        try:
            self.append(charge)
        except ChargeRefused as exc:
            if charge.done is not None and not charge.done.done():
                charge.done.set_exception(exc)
            return
        if charge.done is not None and not charge.done.done():
            charge.done.set_result(None)

    def append(self, charge: PendingCharge) -> None:
        """Settles ``charge`` (not one against a ledger hold) by appending it to the
        journal file; raises ChargeRefused, with nothing written, if the write fails."""
        if self._thread is None:
            self._started()
        try:
            segment = self._segment
            if segment is None:
                segment = self._segment = _Segment.create(self._directory)
            segment.append(charge.journal_record())
        except OSError:
            log.exception("appending a charge to the journal failed")
            raise _refused(charge, "journal write failed") from None
        self.groups += 1
        self._written.append(charge)
        if segment.size >= SEGMENT_BYTES:
            self._written.append(segment)
            self._segment = None
        # The thread sets the flag, then looks at ``_written``; this appended first and
        # reads the flag second, so one of the two sees the other.
        if self._idle:
            self._idle = False
            self._queue.put(None)

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        future = self._started().create_future()
        self._queue.put(_Call(functools.partial(fn, *args), future))
        return await future

    async def recover(self) -> int:
        """Posts what earlier processes settled and did not post; returns how many."""
        return int(await self._call(self._recover))

    async def post_all(self) -> int:
        """Posts every charge written so far; returns how many that was."""
        return int(await self._call(self._post_backlog))

    async def developer_balance(self, account_id: str, sandbox: bool) -> int:
        return int(await self._call(self._developer_balance, account_id, sandbox))

    async def close(self) -> None:
        """Writes what was submitted, posts everything, closes; the thread then ends."""
        if self._thread is None:
            return
        if self._segment is not None:
            self._written.append(self._segment)
            self._segment = None
        await self._call(self._close)
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        self._loop = self._thread = None

    @staticmethod
    def _resolve(outcomes: list[_Outcome]) -> None:
        for future, error, result in outcomes:
            if future is None or future.done():
                continue  # its waiter was cancelled; the work was done all the same
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
        # When the loop wakes it, this thread needs the GIL the loop still holds: as a batch
        # thread (Linux) it waits for the loop to go idle instead of preempting it.
        with contextlib.suppress(AttributeError, OSError):
            os.sched_setscheduler(threading.get_native_id(), os.SCHED_BATCH, os.sched_param(0))
        due: float | None = None  # when what was taken is to be posted
        while not self._closing:
            call = self._wait(due)
            self._take()
            if due is None and self._backlog:
                due = time.monotonic() + self._post_interval_s
            outcomes: list[_Outcome] = []
            if call is not None:
                try:
                    outcomes.append((call.future, None, call.fn()))
                except Exception as exc:
                    outcomes.append((call.future, exc, None))
            if due is not None and not self._closing and time.monotonic() >= due:
                try:
                    self._post_backlog()
                except Exception:
                    log.exception("posting journaled charges failed; will retry")
                due = time.monotonic() + self._post_interval_s if self._backlog else None
            if outcomes:
                try:
                    loop.call_soon_threadsafe(self._resolve, outcomes)
                except RuntimeError:  # the event loop is closed: nobody is waiting
                    return

    def _wait(self, due: float | None) -> _Call | None:
        """The next call, if one comes before ``due``; with nothing due, waits until the
        loop writes charges or makes a call."""
        if due is not None:
            with contextlib.suppress(Empty):
                return self._queue.get(timeout=max(0.0, due - time.monotonic()))
            return None
        self._idle = True
        if self._written:
            self._idle = False
            return None
        call = self._queue.get()
        self._idle = False
        return call

    def _take(self) -> None:
        """Takes what the loop wrote since the last time."""
        while True:
            try:
                item = self._written.popleft()
            except IndexError:
                return
            if not isinstance(item, _Segment):
                self._unposted[item.account_id, item.sandbox] += item.charged_micros
            self._backlog.append(item)

    def _post_backlog(self) -> int:
        """Posts every charge taken, ``batch_max`` a transaction, deleting each segment
        once all its charges are posted; returns how many charges. A database error
        leaves what is not yet posted for the next try."""
        self._take()
        posted = 0
        backlog = self._backlog
        while backlog:
            head = backlog[0]
            if isinstance(head, _Segment):
                head.remove()
                del backlog[0]
                continue
            run: list[PendingCharge] = []
            for item in backlog:
                if isinstance(item, _Segment) or len(run) == self._batch_max:
                    break
                run.append(item)
            self._post_charges(run)
            del backlog[: len(run)]
            posted += len(run)
        return posted

    def _post_charges(self, run: list[PendingCharge]) -> None:
        """Posts ``run`` in one transaction; a charge the ledger refuses is kept apart."""
        try:
            self._post_now(run)
        except (ChargeRefused, sqlite3.IntegrityError) as exc:
            if len(run) > 1:  # find the offender; post the rest one by one
                for charge in run:
                    self._post_charges([charge])
            else:
                self._keep_refused(run[0], exc)
            return
        unposted = self._unposted
        for charge in run:
            unposted[charge.account_id, charge.sandbox] -= charge.charged_micros

    def _keep_refused(self, charge: PendingCharge, error: Exception) -> None:
        # Settled and answered, but the ledger refuses it: kept for an operator. Its amount
        # stays in ``_unposted``, as the developer's wallet counted it spent.
        log.error("a journaled charge cannot be posted: %s", error, extra={"job_id": charge.job_id})
        self._connection().execute(
            "INSERT INTO charge_journal (body, failed_at, error) VALUES (?, ?, ?)",
            (charge.to_json(), sqlite_value(datetime.now(UTC)), str(error)[:500]),
        )

    def _post_now(self, batch: list[PendingCharge]) -> None:
        """Posts ``batch`` to the ledger in one transaction; raises ChargeRefused or
        IntegrityError, nothing written, if the ledger refuses any of it."""
        conn = self._connection()
        plan = plan_batch(batch, for_sqlite=True)
        conn.execute("BEGIN IMMEDIATE")
        try:
            _write_plan(conn, plan)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _post_held(self, charge: PendingCharge) -> None:
        """A charge that settles a ledger hold: posted at once, as the hold is."""
        try:
            self._post_now([charge])
        except (ChargeRefused, sqlite3.IntegrityError) as exc:
            raise _refused(charge, "refused") from exc
        except Exception as exc:
            log.exception("writing a charge failed")
            raise _refused(charge, "database error") from exc

    # -- recovery, reads, and closing ---------------------------------------------------------
    def _recover(self) -> int:
        """Takes the segments no live process holds, and the rows an earlier version
        journaled in ``charge_journal``, and posts every charge in them not yet posted."""
        found: list[PendingCharge] = []
        for path in sorted(self._directory.glob("*.log")):
            fd = os.open(path, os.O_RDONLY)
            if not _lock(fd, wait=False):
                os.close(fd)  # a live process is still writing or posting it
                continue
            found.extend(self._read_segment(path))
            self._backlog.append(_Segment(path, fd))
        conn = self._connection()
        rows = conn.execute(
            "SELECT seq, body FROM charge_journal WHERE failed_at IS NULL ORDER BY seq"
        ).fetchall()
        found.extend(PendingCharge.from_json(body) for _, body in rows)
        fresh = self._not_posted(found)
        for charge in fresh:
            self._unposted[charge.account_id, charge.sandbox] += charge.charged_micros
        # Charges first, then the segments they came from: deleted once all are posted.
        self._backlog[:0] = fresh
        self._post_backlog()
        if rows:
            conn.execute(
                "DELETE FROM charge_journal WHERE failed_at IS NULL AND seq <= ?", (rows[-1][0],)
            )
        return len(fresh)

    @staticmethod
    def _read_segment(path: Path) -> list[PendingCharge]:
        *lines, torn = path.read_bytes().split(b"\n")
        if torn:
            # Cut by the crash in the middle of a write: its answers were never sent.
            log.warning("dropped a torn record at the end of %s", path.name)
        found: list[PendingCharge] = []
        damaged = 0
        for line in lines:
            try:
                found.append(PendingCharge.from_json(line))
            except (ValueError, TypeError):
                damaged += 1
        if damaged:
            kept = path.with_suffix(".damaged")
            path.rename(kept)
            log.error("%d unreadable record(s) in %s; the file is kept as %s", damaged, path, kept)
        return found

    def _not_posted(self, found: list[PendingCharge]) -> list[PendingCharge]:
        """``found`` less the charges the ledger has, or refused before (a crash after a
        posting committed and before its segment was deleted)."""
        conn = self._connection()
        known: set[str] = set()
        ids = [charge.job_id for charge in found]
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            known.update(
                job_id
                for (job_id,) in conn.execute(
                    f"SELECT job_id FROM charges WHERE job_id IN ({','.join('?' * len(chunk))})",  # noqa: S608
                    chunk,
                )
            )
        known.update(
            job_id
            for (job_id,) in conn.execute(
                "SELECT json_extract(body, '$.job_id') FROM charge_journal "
                "WHERE failed_at IS NOT NULL"
            )
        )
        fresh = []
        for charge in found:
            if charge.job_id not in known:
                known.add(charge.job_id)
                fresh.append(charge)
        return fresh

    def _developer_balance(self, account_id: str, sandbox: bool) -> int:
        book = developer_book(account_id, sandbox=sandbox)
        found = (
            self._connection()
            .execute("SELECT amount_micros FROM balances WHERE book = ?", (book,))
            .fetchone()
        )
        return (int(found[0]) if found else 0) - self._unposted.get((account_id, sandbox), 0)

    def _close(self) -> None:
        try:
            self._post_backlog()
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
        # The SQLite journal while the writer runs, else None: a charge appended to it is
        # durable when ``append`` returns (``Billing.settle_now``'s test for its fast path).
        self.journal: _SqliteJournal | None = None

    @property
    def batches(self) -> int:
        """Durable commits so far (for benchmarks and tests)."""
        return self._journal.groups if self._journal is not None else self._batches

    async def recover(self) -> int:
        """Posts what a previous process settled but did not post; call before serving."""
        if self._journal is None:
            return 0
        recovered = await self._journal.recover()
        if recovered:
            log.info("posted %d charge(s) journaled before a restart", recovered)
        return recovered

    def start(self) -> None:
        self._running = True
        self.journal = self._journal
        if self._journal is None:
            self._task = asyncio.create_task(self._run(), name="settlement-writer")

    def write(self, charge: PendingCharge) -> asyncio.Future[None] | None:
        """Settles ``charge``: None when it is durable already (appended to the SQLite
        journal before this returned), else a future set once it is. Raises
        ChargeRefused, with nothing written, when it cannot be settled now."""
        if self._journal is None or charge.hold_id is not None:
            return self.submit(charge)
        if not self._running:
            raise _refused(charge, "the settlement writer is not running")
        self._journal.append(charge)
        return None

    def submit(self, charge: PendingCharge) -> asyncio.Future[None]:
        """Settles ``charge``; the future is set once it is durable (ChargeRefused if it
        could not be written)."""
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

    async def developer_balance(self, account_id: str, sandbox: bool) -> int | None:
        """A developer book's balance net of charges not yet posted (None: read the
        ledger, nothing is pending outside it)."""
        if self._journal is None:
            return None
        return await self._journal.developer_balance(account_id, sandbox)

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
        self.journal = None
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
