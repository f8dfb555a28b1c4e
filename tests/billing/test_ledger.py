"""The ledger against a real SQLite file: operations, errors, invariants, races, migration."""

from __future__ import annotations

import asyncio
import itertools
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Connection, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from swarmgate.accounts import service
from swarmgate.billing.ledger import (
    EXTERNAL_PAYOUTS,
    EXTERNAL_TOPUPS,
    PLATFORM_REVENUE,
    SANDBOX_USAGE,
    Balance,
    Ledger,
    Posting,
    balanced,
    settle_postings,
)
from swarmgate.errors import BillingError, InsufficientCredits, NotFound, RequestError
from swarmgate.store.db import alembic_config, create_engine, migrate
from swarmgate.store.tables import (
    accounts,
    balances,
    holds,
    ledger_entries,
    ledger_transactions,
)

T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
DEV, DEV2, PROV, PROV2 = "acct_dev", "acct_dev2", "acct_prov", "acct_prov2"


class Clock:
    """A hand-driven clock, so expiry is tested without sleeping."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


async def add_accounts(engine: AsyncEngine, *ids: str) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            insert(accounts),
            [
                {"id": i, "name": i, "is_developer": True, "is_provider": True, "created_at": T0}
                for i in ids
            ],
        )


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(sqlite_url(tmp_path / "ledger.db"))
    await migrate(engine)
    await add_accounts(engine, DEV, DEV2, PROV, PROV2)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ledger(engine: AsyncEngine, clock: Clock) -> Ledger:
    return Ledger(engine, clock=clock)


async def book(ledger: Ledger, name: str) -> int:
    return (await ledger.book_balances([name]))[name]


async def count_rows(engine: AsyncEngine, table: Any) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(table)) or 0)


async def assert_invariants(engine: AsyncEngine) -> None:
    """Everything the ledger promises, checked from the raw tables."""
    async with engine.connect() as conn:
        unbalanced = (
            await conn.execute(
                select(ledger_entries.c.transaction_id)
                .group_by(ledger_entries.c.transaction_id)
                .having(func.sum(ledger_entries.c.amount_micros) != 0)
            )
        ).all()
        assert unbalanced == [], "a transaction's entries do not sum to zero"

        from_entries: dict[str, int] = dict(
            (
                await conn.execute(
                    select(
                        ledger_entries.c.book, func.sum(ledger_entries.c.amount_micros)
                    ).group_by(ledger_entries.c.book)
                )
            ).all()
        )
        table: dict[str, int] = dict(
            (await conn.execute(select(balances.c.book, balances.c.amount_micros))).all()
        )
        nonzero_table = {b: a for b, a in table.items() if a != 0}
        nonzero_entries = {b: a for b, a in from_entries.items() if a != 0}
        assert nonzero_table == nonzero_entries, "balances table drifted from the entries"
        assert sum(table.values()) == 0, "money was created or destroyed"
        for name, amount in table.items():
            if not name.startswith("external:"):
                assert amount >= 0, f"{name} is negative: {amount}"

        # Each hold: one hold transaction, at most one resolution, matching its status.
        hold_rows = (await conn.execute(select(holds))).all()
        txns = (
            await conn.execute(
                select(ledger_transactions.c.hold_id, ledger_transactions.c.kind).where(
                    ledger_transactions.c.hold_id.is_not(None)
                )
            )
        ).all()
        kinds: dict[str, list[str]] = {}
        for hold_id, kind in txns:
            kinds.setdefault(hold_id, []).append(kind)
        resolution = {"settled": "settle", "voided": "void", "expired": "expire"}
        open_per_book: dict[str, int] = {}
        for h in hold_rows:
            posted = sorted(kinds.get(h.id, []))
            if h.status == "open":
                assert posted == ["hold"], (h.id, posted)
                name = f"{'sandbox:holds' if h.sandbox else 'holds'}:{h.account_id}"
                open_per_book[name] = open_per_book.get(name, 0) + h.amount_micros
            else:
                assert posted == sorted(["hold", resolution[h.status]]), (h.id, posted)
                assert h.resolved_at is not None
        held_books = {
            b: a for b, a in nonzero_table.items() if b.startswith(("holds:", "sandbox:holds:"))
        }
        assert held_books == {b: a for b, a in open_per_book.items() if a}, (
            "holds books differ from the sum of open holds"
        )


# -- pure postings ----------------------------------------------------------------------
def test_balanced_refuses_entries_that_do_not_sum_to_zero() -> None:
    with pytest.raises(ValueError, match="does not balance"):
        balanced([Posting("developer:a", 10), Posting("external:topups", -9)])


def test_balanced_refuses_floats() -> None:
    with pytest.raises(TypeError):
        balanced([Posting("developer:a", 0.5), Posting("external:topups", -0.5)])  # type: ignore[arg-type]


def test_balanced_nets_sorts_and_drops_zeros() -> None:
    assert balanced(
        [Posting("b", 5), Posting("a", -5), Posting("b", -2), Posting("c", 2), Posting("z", 0)]
    ) == [Posting("a", -5), Posting("b", 3), Posting("c", 2)]


@pytest.mark.parametrize(
    ("held", "charged", "sandbox", "expected"),
    [
        (
            1000,
            700,
            False,
            {"holds:d": -1000, "developer:d": 300, "provider:p": 595, PLATFORM_REVENUE: 105},
        ),
        (1000, 1000, False, {"holds:d": -1000, "provider:p": 850, PLATFORM_REVENUE: 150}),
        (1000, 0, False, {"holds:d": -1000, "developer:d": 1000}),
        (1, 1, False, {"holds:d": -1, PLATFORM_REVENUE: 1}),
        (1000, 700, True, {"sandbox:holds:d": -1000, "sandbox:d": 300, SANDBOX_USAGE: 700}),
    ],
)
def test_settle_postings(held: int, charged: int, sandbox: bool, expected: dict[str, int]) -> None:
    postings = settle_postings("d", held, charged, "p", 8500, sandbox=sandbox)
    assert dict(postings) == expected


def test_settle_postings_refuse_charging_more_than_held() -> None:
    with pytest.raises(ValueError, match="cannot charge"):
        settle_postings("d", 10, 11, "p")


# -- top-ups ----------------------------------------------------------------------------
async def test_top_up_credits_available_balance(ledger: Ledger, engine: AsyncEngine) -> None:
    await ledger.top_up(DEV, 5_000_000, "admin")
    await ledger.top_up(DEV, 250, "admin")
    assert await ledger.balance(DEV) == Balance(5_000_250, 0)
    assert await book(ledger, EXTERNAL_TOPUPS) == -5_000_250
    await assert_invariants(engine)


async def test_top_up_is_idempotent_per_external_event(ledger: Ledger, engine: AsyncEngine) -> None:
    first = await ledger.top_up(DEV, 1_000, "stripe", external_id="evt_1")
    again = await ledger.top_up(DEV, 1_000, "stripe", external_id="evt_1")
    other_source = await ledger.top_up(DEV, 1_000, "paypal", external_id="evt_1")
    assert again == first
    assert other_source != first
    assert (await ledger.balance(DEV)).available_micros == 2_000
    await assert_invariants(engine)


@pytest.mark.parametrize(("account", "amount"), [(DEV, 999), (DEV2, 1_000)])
async def test_top_up_replay_with_different_terms_is_refused(
    ledger: Ledger, account: str, amount: int
) -> None:
    await ledger.top_up(DEV, 1_000, "stripe", external_id="evt_1")
    with pytest.raises(RequestError, match="already posted"):
        await ledger.top_up(account, amount, "stripe", external_id="evt_1")


async def test_concurrent_replays_of_one_event_credit_once(ledger: Ledger) -> None:
    ids = await asyncio.gather(
        *(ledger.top_up(DEV, 700, "stripe", external_id="evt_race") for _ in range(20))
    )
    assert len(set(ids)) == 1
    assert (await ledger.balance(DEV)).available_micros == 700


@pytest.mark.parametrize(
    ("amount", "error"),
    [
        (0, RequestError),
        (-5, RequestError),
        (10**15 + 1, RequestError),
        (1.5, TypeError),
        (True, TypeError),
    ],
)
async def test_top_up_refuses_bad_amounts(
    ledger: Ledger, engine: AsyncEngine, amount: Any, error: type[Exception]
) -> None:
    with pytest.raises(error):
        await ledger.top_up(DEV, amount, "admin")
    assert await count_rows(engine, ledger_transactions) == 0


async def test_top_up_of_unknown_account_is_not_found(ledger: Ledger) -> None:
    with pytest.raises(NotFound):
        await ledger.top_up("acct_nobody", 100, "admin")


# -- holds ------------------------------------------------------------------------------
async def test_hold_moves_available_to_held(ledger: Ledger, engine: AsyncEngine) -> None:
    await ledger.top_up(DEV, 1_000, "admin")
    hold_id = await ledger.hold(DEV, 400, "job_1", ttl_s=60)
    assert hold_id.startswith("hold_")
    assert await ledger.balance(DEV) == Balance(600, 400)
    await ledger.hold(DEV, 600, "job_2", ttl_s=60)  # exactly the rest
    assert await ledger.balance(DEV) == Balance(0, 1_000)
    await assert_invariants(engine)


async def test_short_hold_raises_and_writes_nothing(ledger: Ledger, engine: AsyncEngine) -> None:
    await ledger.top_up(DEV, 1_000, "admin")
    before = (await count_rows(engine, holds), await count_rows(engine, ledger_transactions))
    with pytest.raises(InsufficientCredits) as caught:
        await ledger.hold(DEV, 1_001, "job_1", ttl_s=60)
    assert caught.value.status_code == 402
    assert caught.value.code == "INSUFFICIENT_CREDITS"
    assert caught.value.type == "insufficient_quota"
    after = (await count_rows(engine, holds), await count_rows(engine, ledger_transactions))
    assert after == before
    assert await ledger.balance(DEV) == Balance(1_000, 0)


async def test_hold_for_account_without_credit_is_insufficient(ledger: Ledger) -> None:
    with pytest.raises(InsufficientCredits):
        await ledger.hold(DEV2, 1, "job_1", ttl_s=60)


async def test_zero_hold_for_a_free_model(ledger: Ledger, engine: AsyncEngine) -> None:
    hold_id = await ledger.hold(DEV, 0, "job_free", ttl_s=60)
    settlement = await ledger.settle(hold_id, 0, PROV)
    assert settlement.charged_micros == 0
    await assert_invariants(engine)


@pytest.mark.parametrize(
    ("amount", "ttl", "error"), [(-1, 60, RequestError), (1.0, 60, TypeError), (1, 0, ValueError)]
)
async def test_hold_refuses_bad_arguments(
    ledger: Ledger, amount: Any, ttl: float, error: type[Exception]
) -> None:
    await ledger.top_up(DEV, 1_000, "admin")
    with pytest.raises(error):
        await ledger.hold(DEV, amount, "job", ttl_s=ttl)


# -- settlement -------------------------------------------------------------------------
async def test_settle_pays_provider_platform_and_releases_rest(
    ledger: Ledger, engine: AsyncEngine
) -> None:
    await ledger.top_up(DEV, 10_000, "admin")
    hold_id = await ledger.hold(DEV, 1_000, "job_1", ttl_s=60)
    settlement = await ledger.settle(hold_id, 700, PROV, 8500)
    assert (
        settlement.charged_micros,
        settlement.provider_micros,
        settlement.platform_micros,
        settlement.released_micros,
    ) == (700, 595, 105, 300)
    assert await ledger.balance(DEV) == Balance(9_300, 0)
    assert await ledger.provider_earnings(PROV) == 595
    assert await book(ledger, PLATFORM_REVENUE) == 105
    async with engine.connect() as conn:
        row = (await conn.execute(select(holds).where(holds.c.id == hold_id))).one()
    assert (row.status, row.charged_micros) == ("settled", 700)
    await assert_invariants(engine)


async def test_settle_caps_the_charge_at_the_hold(ledger: Ledger, engine: AsyncEngine) -> None:
    await ledger.top_up(DEV, 5_000, "admin")
    hold_id = await ledger.hold(DEV, 1_000, "job_1", ttl_s=60)
    settlement = await ledger.settle(hold_id, 4_000, PROV)
    assert (settlement.charged_micros, settlement.released_micros) == (1_000, 0)
    assert await ledger.balance(DEV) == Balance(4_000, 0)
    await assert_invariants(engine)


@pytest.mark.parametrize("first", ["settle", "void", "expire"])
async def test_a_resolved_hold_cannot_be_settled(
    ledger: Ledger, engine: AsyncEngine, clock: Clock, first: str
) -> None:
    await ledger.top_up(DEV, 5_000, "admin")
    hold_id = await ledger.hold(DEV, 1_000, "job_1", ttl_s=60)
    if first == "settle":
        await ledger.settle(hold_id, 500, PROV)
    elif first == "void":
        assert await ledger.void(hold_id)
    else:
        clock.advance(61)
        assert await ledger.expire_holds() == 1
    with pytest.raises(BillingError) as caught:
        await ledger.settle(hold_id, 500, PROV)
    assert caught.value.code == "HOLD_NOT_OPEN"
    await assert_invariants(engine)


async def test_racing_resolutions_resolve_a_hold_once(ledger: Ledger, engine: AsyncEngine) -> None:
    await ledger.top_up(DEV, 5_000, "admin")
    hold_id = await ledger.hold(DEV, 1_000, "job_1", ttl_s=60)
    results = await asyncio.gather(
        *(ledger.settle(hold_id, 900, PROV) for _ in range(10)),
        *(ledger.void(hold_id) for _ in range(10)),
        return_exceptions=True,
    )
    won = [r for r in results if r is True or not isinstance(r, (bool, BaseException))]
    assert len(won) == 1
    assert all(isinstance(r, BillingError) or r is False for r in results if r not in won)
    await assert_invariants(engine)


async def test_settle_unknown_hold_or_provider(ledger: Ledger, engine: AsyncEngine) -> None:
    with pytest.raises(NotFound):
        await ledger.settle("hold_missing", 1, PROV)
    await ledger.top_up(DEV, 5_000, "admin")
    hold_id = await ledger.hold(DEV, 1_000, "job_1", ttl_s=60)
    with pytest.raises(NotFound):
        await ledger.settle(hold_id, 500, "acct_ghost")
    # The failed settle rolled back whole: the hold is still open and settles later.
    assert (await ledger.settle(hold_id, 500, PROV)).charged_micros == 500
    await assert_invariants(engine)


@pytest.mark.parametrize(
    ("cost", "bps", "error"),
    [(-1, 8500, RequestError), (1.5, 8500, TypeError), (1, 10_001, ValueError)],
)
async def test_settle_refuses_bad_arguments(
    ledger: Ledger, cost: Any, bps: int, error: type[Exception]
) -> None:
    await ledger.top_up(DEV, 5_000, "admin")
    hold_id = await ledger.hold(DEV, 1_000, "job_1", ttl_s=60)
    with pytest.raises(error):
        await ledger.settle(hold_id, cost, PROV, bps)


# -- void and expiry --------------------------------------------------------------------
async def test_void_releases_once(ledger: Ledger, engine: AsyncEngine) -> None:
    await ledger.top_up(DEV, 1_000, "admin")
    hold_id = await ledger.hold(DEV, 800, "job_1", ttl_s=60)
    assert await ledger.void(hold_id) is True
    assert await ledger.void(hold_id) is False
    assert await ledger.balance(DEV) == Balance(1_000, 0)
    await assert_invariants(engine)


async def test_void_after_settle_changes_nothing(ledger: Ledger) -> None:
    await ledger.top_up(DEV, 1_000, "admin")
    hold_id = await ledger.hold(DEV, 800, "job_1", ttl_s=60)
    await ledger.settle(hold_id, 100, PROV)
    assert await ledger.void(hold_id) is False
    assert await ledger.balance(DEV) == Balance(900, 0)


async def test_void_unknown_hold_is_not_found(ledger: Ledger) -> None:
    with pytest.raises(NotFound):
        await ledger.void("hold_missing")


async def test_expire_releases_only_holds_past_their_expiry(
    ledger: Ledger, engine: AsyncEngine, clock: Clock
) -> None:
    await ledger.top_up(DEV, 1_000, "admin")
    short = await ledger.hold(DEV, 100, "job_short", ttl_s=10)
    long = await ledger.hold(DEV, 200, "job_long", ttl_s=100)
    assert await ledger.expire_holds(T0 + timedelta(seconds=9)) == 0
    assert await ledger.expire_holds(T0 + timedelta(seconds=10)) == 1
    assert await ledger.expire_holds(T0 + timedelta(seconds=50)) == 0
    assert await ledger.balance(DEV) == Balance(800, 200)
    assert await ledger.void(short) is False
    await ledger.settle(long, 150, PROV)
    assert await ledger.expire_holds(T0 + timedelta(days=1)) == 0
    await assert_invariants(engine)


async def test_expire_accepts_other_time_zones(ledger: Ledger, clock: Clock) -> None:
    await ledger.top_up(DEV, 1_000, "admin")
    await ledger.hold(DEV, 100, "job", ttl_s=10)
    plus_two = timezone(timedelta(hours=2))
    # 13:00:09 at +02:00 is 11:00:09 UTC: before the hold was even taken.
    assert await ledger.expire_holds(datetime(2026, 11, 23, 13, 0, 9, tzinfo=plus_two)) == 0
    assert await ledger.expire_holds(datetime(2026, 11, 23, 14, 0, 10, tzinfo=plus_two)) == 1


# -- payouts ----------------------------------------------------------------------------
async def test_payout_moves_earnings_out(ledger: Ledger, engine: AsyncEngine) -> None:
    await ledger.top_up(DEV, 10_000, "admin")
    await ledger.settle(await ledger.hold(DEV, 10_000, "job", ttl_s=60), 10_000, PROV)
    assert await ledger.provider_earnings(PROV) == 8_500
    await ledger.payout(PROV, 8_000)
    assert await ledger.provider_earnings(PROV) == 500
    assert await book(ledger, EXTERNAL_PAYOUTS) == 8_000
    with pytest.raises(BillingError) as caught:
        await ledger.payout(PROV, 501)
    assert caught.value.code == "INSUFFICIENT_EARNINGS"
    assert not isinstance(caught.value, InsufficientCredits)
    assert await ledger.provider_earnings(PROV) == 500
    await assert_invariants(engine)


async def test_payout_of_provider_without_earnings(ledger: Ledger) -> None:
    with pytest.raises(BillingError, match="exceeds"):
        await ledger.payout(PROV2, 1)


# -- sandbox ----------------------------------------------------------------------------
async def test_sandbox_never_touches_real_books(ledger: Ledger, engine: AsyncEngine) -> None:
    await ledger.top_up(DEV, 1_000, "admin")
    await ledger.top_up(DEV, 50_000, "sandbox", sandbox=True)
    hold_id = await ledger.hold(DEV, 20_000, "job_test", ttl_s=60, sandbox=True)
    assert await ledger.balance(DEV, sandbox=True) == Balance(30_000, 20_000)
    assert await ledger.balance(DEV) == Balance(1_000, 0)
    settlement = await ledger.settle(hold_id, 12_000, PROV)
    assert (settlement.provider_micros, settlement.platform_micros) == (0, 0)
    assert await ledger.balance(DEV, sandbox=True) == Balance(38_000, 0)
    assert await ledger.balance(DEV) == Balance(1_000, 0)
    assert await ledger.provider_earnings(PROV) == 0
    assert await book(ledger, PLATFORM_REVENUE) == 0
    assert await book(ledger, SANDBOX_USAGE) == 12_000
    await assert_invariants(engine)


async def test_sandbox_and_live_credit_do_not_mix(ledger: Ledger) -> None:
    await ledger.top_up(DEV, 50_000, "sandbox", sandbox=True)
    with pytest.raises(InsufficientCredits):
        await ledger.hold(DEV, 1, "job_live", ttl_s=60)
    await ledger.top_up(DEV2, 50_000, "admin")
    with pytest.raises(InsufficientCredits, match="sandbox"):
        await ledger.hold(DEV2, 1, "job_test", ttl_s=60, sandbox=True)


# -- the database backs the guards up ---------------------------------------------------
async def test_check_constraint_refuses_a_negative_developer_book(
    ledger: Ledger, engine: AsyncEngine
) -> None:
    await ledger.top_up(DEV, 100, "admin")
    with pytest.raises(IntegrityError):
        async with engine.begin() as conn:
            await conn.execute(
                update(balances)
                .where(balances.c.book == f"developer:{DEV}")
                .values(amount_micros=-1)
            )
    assert await ledger.balance(DEV) == Balance(100, 0)


# -- accounts: the welcome credit is a ledger top-up ------------------------------------
async def test_create_account_posts_welcome_credit(ledger: Ledger, engine: AsyncEngine) -> None:
    account = await service.create_account(engine, name="new dev", credit_micros=5_000_000)
    assert await ledger.balance(account["id"]) == Balance(5_000_000, 0)
    broke = await service.create_account(engine, name="no credit")
    assert await ledger.balance(broke["id"]) == Balance(0, 0)
    async with engine.connect() as conn:
        sources = (await conn.execute(select(ledger_transactions.c.source))).scalars().all()
    assert sources == ["welcome"]
    await assert_invariants(engine)


# -- the race ---------------------------------------------------------------------------
async def test_hundred_racing_holds_for_thirty_seven_holds_of_credit(
    ledger: Ledger, engine: AsyncEngine
) -> None:
    price = 1_000
    await ledger.top_up(DEV, 37 * price, "admin")
    racing = True
    lowest_seen: list[int] = []

    async def watch() -> None:
        while racing:
            lowest_seen.append((await ledger.balance(DEV)).available_micros)
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    results = await asyncio.gather(
        *(ledger.hold(DEV, price, f"job_{i}", ttl_s=60) for i in range(100)),
        return_exceptions=True,
    )
    racing = False
    await watcher
    won = [r for r in results if isinstance(r, str)]
    lost = [r for r in results if not isinstance(r, str)]
    assert len(won) == 37
    assert len(set(won)) == 37
    assert all(isinstance(r, InsufficientCredits) for r in lost), lost[:3]
    assert await ledger.balance(DEV) == Balance(0, 37 * price)
    assert lowest_seen
    assert min(lowest_seen) >= 0
    await assert_invariants(engine)


# -- migration --------------------------------------------------------------------------
def _upgrade_to(connection: Connection, revision: str) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, revision)


async def test_migration_runs_from_empty(tmp_path: Path) -> None:
    engine = create_engine(sqlite_url(tmp_path / "fresh.db"))
    try:
        await migrate(engine)
        await migrate(engine)  # idempotent
        async with engine.connect() as conn:
            version = await conn.scalar(text("SELECT version_num FROM alembic_version"))
            names = set(
                (await conn.execute(text("SELECT name FROM sqlite_master WHERE type='table'")))
                .scalars()
                .all()
            )
        assert version == "0008"
        assert {
            "holds",
            "ledger_transactions",
            "ledger_entries",
            "balances",
            "charges",
            "idempotency_keys",
            "payouts",
            "sessions",
            "webhook_endpoints",
        } <= names
    finally:
        await engine.dispose()


async def test_the_migrations_build_exactly_the_declared_tables(tmp_path: Path) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from swarmgate.store.tables import metadata

    engine = create_engine(sqlite_url(tmp_path / "compare.db"))
    try:
        await migrate(engine)
        async with engine.connect() as conn:
            differences = await conn.run_sync(
                lambda sync: compare_metadata(MigrationContext.configure(sync), metadata)
            )
    finally:
        await engine.dispose()
    assert differences == []


async def test_migration_moves_initial_credit_into_the_ledger(tmp_path: Path) -> None:
    engine = create_engine(sqlite_url(tmp_path / "old.db"))
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_upgrade_to, "0001")
        async with engine.begin() as conn:
            await conn.execute(
                insert(accounts),
                [
                    {
                        "id": "acct_old",
                        "name": "old",
                        "is_developer": True,
                        "is_provider": False,
                        "initial_credit_micros": 5_000_000,
                        "created_at": T0,
                    },
                    {
                        "id": "acct_poor",
                        "name": "poor",
                        "is_developer": True,
                        "is_provider": False,
                        "initial_credit_micros": 0,
                        "created_at": T0,
                    },
                ],
            )
        await migrate(engine)
        ledger = Ledger(engine)
        assert await ledger.balance("acct_old") == Balance(5_000_000, 0)
        assert await ledger.balance("acct_poor") == Balance(0, 0)
        # The backfill used the welcome key, so re-posting the welcome credit is a no-op.
        await ledger.top_up("acct_old", 5_000_000, "welcome", external_id="acct_old")
        assert await ledger.balance("acct_old") == Balance(5_000_000, 0)
        await assert_invariants(engine)
    finally:
        await engine.dispose()


# -- property: random concurrent interleavings keep every invariant ---------------------
DEVELOPERS = (DEV, DEV2)
PROVIDERS = (PROV, PROV2)


@dataclass
class Scenario:
    ledger: Ledger
    clock: Clock
    hold_ids: list[str] = field(default_factory=list)


amounts = st.integers(0, 3_000)
op = st.one_of(
    st.tuples(st.just("top_up"), st.sampled_from(DEVELOPERS), st.integers(1, 5_000), st.booleans()),
    st.tuples(
        st.just("hold"), st.sampled_from(DEVELOPERS), amounts, st.booleans(), st.integers(1, 120)
    ),
    st.tuples(
        st.just("settle"),
        st.integers(0, 50),
        amounts,
        st.sampled_from(PROVIDERS),
        st.integers(0, 10_000),
    ),
    st.tuples(st.just("void"), st.integers(0, 50)),
    st.tuples(st.just("expire"), st.integers(0, 150)),
    st.tuples(st.just("payout"), st.sampled_from(PROVIDERS), st.integers(1, 3_000)),
)
# Each inner list runs concurrently (asyncio.gather); the lists run one after another.
batches = st.lists(st.lists(op, min_size=1, max_size=6), min_size=1, max_size=8)
EXPECTED_REFUSALS = (InsufficientCredits, BillingError)


async def _apply(scenario: Scenario, operation: tuple[Any, ...]) -> Any:
    ledger, name = scenario.ledger, operation[0]
    pick = scenario.hold_ids
    if name == "top_up":
        _, account, amount, sandbox = operation
        return await ledger.top_up(account, amount, "test", sandbox=sandbox)
    if name == "hold":
        _, account, amount, sandbox, ttl = operation
        hold_id = await ledger.hold(account, amount, None, ttl_s=ttl, sandbox=sandbox)
        pick.append(hold_id)
        return hold_id
    if name in ("settle", "void") and not pick:
        return None
    if name == "settle":
        _, index, cost, provider, bps = operation
        return await ledger.settle(pick[index % len(pick)], cost, provider, bps)
    if name == "void":
        return await ledger.void(pick[operation[1] % len(pick)])
    if name == "expire":
        scenario.clock.advance(operation[1])
        return await ledger.expire_holds()
    _, provider, amount = operation
    return await ledger.payout(provider, amount)


async def _run_scenario(db: Path, plan: list[list[tuple[Any, ...]]]) -> None:
    engine = create_engine(sqlite_url(db))
    clock = Clock()
    scenario = Scenario(Ledger(engine, clock=clock), clock)
    try:
        for batch in plan:
            results = await asyncio.gather(
                *(_apply(scenario, operation) for operation in batch), return_exceptions=True
            )
            for result in results:
                if isinstance(result, BaseException) and not isinstance(result, EXPECTED_REFUSALS):
                    raise result
                if isinstance(result, BillingError) and not isinstance(result, InsufficientCredits):
                    assert result.code in ("HOLD_NOT_OPEN", "INSUFFICIENT_EARNINGS")
            await assert_invariants(engine)
    finally:
        await engine.dispose()


async def _build_template(path: Path) -> None:
    engine = create_engine(sqlite_url(path))
    try:
        await migrate(engine)
        await add_accounts(engine, *DEVELOPERS, *PROVIDERS)
    finally:
        await engine.dispose()


def test_random_interleavings_keep_every_invariant(tmp_path: Path) -> None:
    template = tmp_path / "template.db"
    asyncio.run(_build_template(template))
    numbers = itertools.count()

    @settings(
        max_examples=50,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(plan=batches)
    def check(plan: list[list[tuple[Any, ...]]]) -> None:
        db = tmp_path / f"example-{next(numbers)}.db"
        shutil.copyfile(template, db)
        try:
            asyncio.run(_run_scenario(db, plan))
        finally:
            for leftover in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
                leftover.unlink(missing_ok=True)

    check()
