"""Many holds and payout requests racing for the same money, on SQLite and PostgreSQL.

The PostgreSQL runs use the server at ``SWARMGATE_TEST_POSTGRES_URL`` (default: the
local one, trust auth, database ``test``), each in a fresh schema dropped afterwards;
they are skipped, with the reason, when the driver or the server is missing.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from swarmgate.billing.ledger import Balance, Ledger
from swarmgate.billing.payouts import Payouts, PayoutStatus
from swarmgate.errors import BillingError, InsufficientCredits
from swarmgate.store.db import create_engine, migrate
from swarmgate.store.tables import accounts
from tests.billing.test_ledger_properties import check_ledger

POSTGRES_URL = os.environ.get(
    "SWARMGATE_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
DEV, PROV = "acct_racer", "acct_earner"
PRICE = 1_000
WINNERS = 37
RACERS = 100


@asynccontextmanager
async def postgres_engine() -> AsyncIterator[AsyncEngine]:
    """A migrated engine on a schema of its own, dropped on the way out; skips if unavailable."""
    try:
        import asyncpg  # noqa: F401 - only asked whether the driver is installed
    except ImportError:
        pytest.skip("PostgreSQL tests need the asyncpg driver, which is not installed")
    schema = f"sg_test_{secrets.token_hex(6)}"
    admin = create_async_engine(POSTGRES_URL, connect_args={"timeout": 5})
    try:
        async with admin.begin() as conn:
            await conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except (OSError, SQLAlchemyError) as exc:
        await admin.dispose()
        pytest.skip(f"no PostgreSQL at {POSTGRES_URL}: {type(exc).__name__}: {exc}"[:300])
    engine = create_async_engine(
        POSTGRES_URL,
        pool_size=20,
        max_overflow=20,
        connect_args={"server_settings": {"search_path": schema}},
    )
    try:
        await migrate(engine)
        yield engine
    finally:
        await engine.dispose()
        async with admin.begin() as conn:
            await conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        await admin.dispose()


@asynccontextmanager
async def sqlite_engine(path: Path) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    try:
        await migrate(engine)
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
async def engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    opened = sqlite_engine(tmp_path / "race.db") if request.param == "sqlite" else postgres_engine()
    async with opened as engine:
        async with engine.begin() as conn:
            await conn.execute(
                insert(accounts),
                [
                    {
                        "id": i,
                        "name": i,
                        "is_developer": True,
                        "is_provider": True,
                        "created_at": T0,
                    }
                    for i in (DEV, PROV)
                ],
            )
        yield engine


async def racing(
    count: int, make: Callable[[int], Coroutine[Any, Any, Any]]
) -> tuple[list[Any], list[BaseException]]:
    """Starts ``count`` calls together; returns (results, exceptions)."""
    outcomes = await asyncio.gather(*(make(i) for i in range(count)), return_exceptions=True)
    won = [o for o in outcomes if not isinstance(o, BaseException)]
    lost = [o for o in outcomes if isinstance(o, BaseException)]
    return won, lost


async def test_hundred_holds_race_for_thirty_seven_holds_of_credit(engine: AsyncEngine) -> None:
    ledger = Ledger(engine)
    await ledger.top_up(DEV, WINNERS * PRICE, "admin")
    racing_now = True
    lowest_seen: list[int] = []

    async def watch() -> None:
        while racing_now:
            lowest_seen.append((await ledger.balance(DEV)).available_micros)
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    won, lost = await racing(RACERS, lambda i: ledger.hold(DEV, PRICE, f"job_{i}", ttl_s=60))
    racing_now = False
    await watcher

    assert len(won) == WINNERS
    assert len(set(won)) == WINNERS
    assert len(lost) == RACERS - WINNERS
    assert all(isinstance(e, InsufficientCredits) for e in lost), lost[:3]
    assert await ledger.balance(DEV) == Balance(0, WINNERS * PRICE)
    assert lowest_seen and min(lowest_seen) >= 0
    books = await check_ledger(engine)
    assert books[f"holds:{DEV}"] == WINNERS * PRICE


async def test_racing_payout_requests_never_overdraw_earnings(engine: AsyncEngine) -> None:
    ledger = Ledger(engine)
    payouts = Payouts(engine, threshold_micros=1, bonus_lock_days=30)
    # 85 % of 10_000 earned: room for exactly 8 requests of 1_000 (8_500 earned).
    await ledger.top_up(DEV, 10_000, "admin")
    await ledger.settle(await ledger.hold(DEV, 10_000, "job", ttl_s=60), 10_000, PROV)
    # A locked welcome bonus sits in the same book and must not be paid out with them.
    await payouts.grant_bonus(PROV, 5_000)
    assert (await payouts.funds(PROV)).withdrawable_micros == 8_500

    won, lost = await racing(30, lambda _: payouts.request(PROV, 1_000))

    assert len(won) == 8
    assert all(isinstance(e, BillingError) and e.code == "INSUFFICIENT_EARNINGS" for e in lost)
    funds = await payouts.funds(PROV)
    assert (funds.balance_micros, funds.pending_micros) == (5_500, 8_000)
    assert funds.withdrawable_micros == 500
    books = await check_ledger(engine)
    assert books[f"payouts:pending:{PROV}"] == 8_000


async def test_racing_decisions_move_each_payout_once(engine: AsyncEngine) -> None:
    ledger = Ledger(engine)
    payouts = Payouts(engine, threshold_micros=1, bonus_lock_days=30)
    await ledger.top_up(DEV, 10_000, "admin")
    await ledger.settle(await ledger.hold(DEV, 10_000, "job", ttl_s=60), 10_000, PROV)
    requested = [await payouts.request(PROV, 1_000) for _ in range(4)]

    async def decide(i: int) -> Any:
        payout = requested[i % len(requested)]
        step = (payouts.approve, payouts.reject, payouts.mark_paid)[i % 3]
        if i % 5 == 0:
            return await payouts.cancel(PROV, payout.id)
        return await step(payout.id)

    await racing(40, decide)
    await racing(40, decide)  # a second wave: approved ones may now be paid

    final = {p.id: p.status for p in await payouts.list_payouts(account_id=PROV)}
    paid = sum(1_000 for status in final.values() if status is PayoutStatus.PAID)
    returned = sum(
        1_000
        for status in final.values()
        if status in (PayoutStatus.REJECTED, PayoutStatus.CANCELLED)
    )
    still_open = sum(1_000 for status in final.values() if status.open)
    funds = await payouts.funds(PROV)
    assert funds.paid_micros == paid
    assert funds.pending_micros == still_open
    assert funds.balance_micros == 8_500 - 4_000 + returned
    await check_ledger(engine)
