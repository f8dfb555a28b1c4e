"""The settlement writer on SQLite: a small group of charges is journaled (posted later),
a large one is posted to the ledger at once; either way a charge is durable before its
future resolves, and a charge the ledger refuses fails alone."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from swarmgate.accounts import service
from swarmgate.accounts.keys import utcnow
from swarmgate.billing.ledger import developer_book
from swarmgate.billing.pricing import split_earnings
from swarmgate.billing.settlement import (
    DIRECT_POST_MIN,
    ChargeRefused,
    PendingCharge,
    SettlementWriter,
)
from swarmgate.store.db import create_engine, migrate
from swarmgate.store.tables import charges
from tests.billing.test_ledger_properties import check_ledger


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}")
    await migrate(engine)
    yield engine
    await engine.dispose()


def charge(job_id: str, account_id: str, provider_id: str, amount: int = 100) -> PendingCharge:
    provider, platform = split_earnings(amount, 8_500)
    return PendingCharge(
        job_id=job_id,
        account_id=account_id,
        key_id=None,
        sandbox=False,
        model="m",
        device_id="dev_1",
        provider_account_id=provider_id,
        prompt_tokens=10,
        completion_tokens=20,
        charged_micros=amount,
        provider_micros=provider,
        platform_micros=platform,
        created_at=utcnow(),
    )


async def setup(
    engine: AsyncEngine, post_interval_s: float = 3_600
) -> tuple[str, str, SettlementWriter]:
    """A developer with $1 of credit, a provider, and a started writer (posting from the
    journal only every ``post_interval_s``, or when asked)."""
    dev = await service.create_account(engine, name="dev", credit_micros=1_000_000)
    prov = await service.create_account(engine, name="prov", developer=False, provider=True)
    writer = SettlementWriter(engine, post_interval_s=post_interval_s)
    await writer.recover()
    writer.start()
    return dev["id"], prov["id"], writer


async def counts(engine: AsyncEngine) -> tuple[int, int]:
    async with engine.connect() as conn:
        journaled = await conn.scalar(text("SELECT count(*) FROM charge_journal"))
        posted = await conn.scalar(select(func.count()).select_from(charges))
    return int(journaled or 0), int(posted or 0)


async def test_small_groups_are_journaled_large_ones_posted_at_once(engine: AsyncEngine) -> None:
    # Posting from the journal only when asked, to see where each charge went.
    dev_id, prov_id, writer = await setup(engine)
    try:
        few = [writer.submit(charge(f"job_s{n}", dev_id, prov_id)) for n in range(3)]
        await asyncio.gather(*few)
        assert await counts(engine) == (3, 0)  # settled in the journal, not yet posted

        many = [
            writer.submit(charge(f"job_l{n}", dev_id, prov_id)) for n in range(DIRECT_POST_MIN * 2)
        ]
        await asyncio.gather(*many)
        assert await counts(engine) == (3, DIRECT_POST_MIN * 2)  # in the ledger already

        await writer.posted()
        assert await counts(engine) == (0, 3 + DIRECT_POST_MIN * 2)
    finally:
        await writer.stop()
    balances = await check_ledger(engine)
    assert balances[developer_book(dev_id)] == 1_000_000 - 100 * (3 + DIRECT_POST_MIN * 2)


async def test_a_refused_charge_in_a_large_group_fails_alone(engine: AsyncEngine) -> None:
    dev_id, prov_id, writer = await setup(engine)
    try:
        await writer.submit(charge("job_once", dev_id, prov_id))
        await writer.posted()
        # The same job charged again, among others: the ledger refuses that one only.
        group = [charge(f"job_g{n}", dev_id, prov_id) for n in range(DIRECT_POST_MIN)]
        group.insert(5, charge("job_once", dev_id, prov_id))
        done = [writer.submit(c) for c in group]
        outcomes = await asyncio.gather(*done, return_exceptions=True)
    finally:
        await writer.stop()
    refused = [i for i, o in enumerate(outcomes) if isinstance(o, ChargeRefused)]
    assert refused == [5]
    assert all(o is None for i, o in enumerate(outcomes) if i != 5)
    assert await counts(engine) == (0, 1 + DIRECT_POST_MIN)
    balances = await check_ledger(engine)
    assert balances[developer_book(dev_id)] == 1_000_000 - 100 * (1 + DIRECT_POST_MIN)


async def test_the_writer_thread_posts_the_journal_by_itself(engine: AsyncEngine) -> None:
    dev_id, prov_id, writer = await setup(engine, post_interval_s=0.05)
    try:
        # Submitted in one step of the event loop: one group, one commit.
        await asyncio.gather(
            *(writer.submit(charge(f"job_{n}", dev_id, prov_id)) for n in range(5))
        )
        assert writer.batches == 1
        # Charges arriving one at a time, each waited for, while the thread posts between them.
        for n in range(5, 40):
            await writer.submit(charge(f"job_{n}", dev_id, prov_id))
        async with asyncio.timeout(10):
            while await counts(engine) != (0, 40):
                await asyncio.sleep(0.02)
        assert await writer.developer_balance(developer_book(dev_id)) == 1_000_000 - 100 * 40
    finally:
        await writer.stop()
    late = writer.submit(charge("job_late", dev_id, prov_id))
    with pytest.raises(ChargeRefused):
        await late
    balances = await check_ledger(engine)
    assert balances[developer_book(dev_id)] == 1_000_000 - 100 * 40


async def test_stop_writes_and_posts_everything_submitted(engine: AsyncEngine) -> None:
    dev_id, prov_id, writer = await setup(engine)
    done = [writer.submit(charge(f"job_{n}", dev_id, prov_id)) for n in range(3)]
    await writer.stop()  # before the submitted charges were even handed to the thread
    assert [f.result() for f in done] == [None, None, None]
    assert await counts(engine) == (0, 3)
