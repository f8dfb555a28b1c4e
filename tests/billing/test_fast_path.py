"""``Billing.hold_now`` / ``settle_now``, the request path's one-function settlement, held
to the same results as the general path (``hold`` / ``settle_parts``) it shortcuts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from swarmgate.accounts import service
from swarmgate.accounts.keys import KeySettings, Principal
from swarmgate.billing.ledger import PLATFORM_REVENUE, developer_book, provider_book
from swarmgate.billing.service import BilledPart, Billing, BillingUnavailable
from swarmgate.billing.settlement import CHARGE_COLUMNS, ChargeRefused
from swarmgate.catalog import Pricing
from swarmgate.store.db import create_engine, migrate
from swarmgate.store.tables import balances, charges

CREDIT = 10_000_000
# The columns of a ``charges`` row that differ between two charges by design.
PER_CHARGE = {"job_id", "account_id", "transaction_id", "created_at"}
DEAR = Pricing(input_per_1m_micros=1_000_000, output_per_1m_micros=2_000_000)
ODD = Pricing(input_per_1m_micros=333_333, output_per_1m_micros=777_777)
FREE = Pricing(input_per_1m_micros=0, output_per_1m_micros=0)


@dataclass
class Books:
    engine: AsyncEngine
    billing: Billing
    provider: str


@pytest.fixture
async def books(tmp_path: Path) -> AsyncIterator[Books]:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'fast.db'}")
    await migrate(engine)
    provider = await service.create_account(engine, name="provider", provider=True)
    billing = Billing(engine)
    await billing.start()
    try:
        yield Books(engine, billing, provider["id"])
    finally:
        await billing.stop()
        await engine.dispose()


async def developer(books: Books) -> str:
    account = await service.create_account(
        books.engine, name="dev", credit_micros=CREDIT, sandbox_credit_micros=CREDIT
    )
    return str(account["id"])


async def loaded(books: Books, who: Principal) -> None:
    """The account's first request loads its wallet (the general path)."""
    await books.billing.balance(who.account_id, sandbox=who.sandbox)
    books.billing.void(
        await books.billing.hold(who, model="m", pricing=DEAR, amount_micros=0, job_id="warm")
    )
    hold = books.billing.hold_now(who, "m", DEAR, 0, "warm.2")
    assert hold is not None
    books.billing.void(hold)


# (pricing, prompt tokens, completion tokens, hold, sandbox, has a provider)
CASES: list[tuple[Pricing, int, int, int, bool, bool]] = [
    (DEAR, 12, 16, 1_000, False, True),
    (DEAR, 12, 16, 20, False, True),  # the usage costs more than the hold: capped
    (ODD, 7, 3, 1_000, False, True),  # a ceiling and an 85 % split with remainders
    (ODD, 7, 3, 1_000, False, False),  # no provider (a cloud answer): all platform
    (ODD, 7, 3, 1_000, True, True),  # sandbox: no provider, no platform
    (FREE, 50, 50, 0, False, True),
    (DEAR, 0, 0, 500, False, True),
]


async def test_the_fast_path_charges_what_the_general_path_charges(books: Books) -> None:
    fast_id, slow_id = await developer(books), await developer(books)
    billing = books.billing
    for mode in ("live", "test"):
        for account_id in (fast_id, slow_id):
            await loaded(books, Principal(account_id, None, mode))  # type: ignore[arg-type]
    for n, (pricing, prompt, completion, amount, sandbox, has_provider) in enumerate(CASES):
        mode: Any = "test" if sandbox else "live"
        provider = books.provider if has_provider else None
        fast_who, slow_who = Principal(fast_id, None, mode), Principal(slow_id, None, mode)
        fast_hold = billing.hold_now(fast_who, "m", pricing, amount, f"fast{n}")
        assert fast_hold is not None
        slow_hold = await billing.hold(
            slow_who, model="m", pricing=pricing, amount_micros=amount, job_id=f"slow{n}"
        )
        fast = billing.settle_now(fast_hold, prompt, completion, "dev_1", provider, "m", pricing)
        slow = await billing.settle_parts(
            slow_hold, (BilledPart("dev_1", provider, "m", pricing, prompt, completion),)
        )
        assert fast == slow, CASES[n]
        assert fast_hold.resolved and slow_hold.resolved
        fast_wallet, slow_wallet = fast_hold.wallet, slow_hold.wallet
        assert fast_wallet is not None and slow_wallet is not None
        assert (fast_wallet.committed, fast_wallet.pending, fast_wallet.reserved) == (
            slow_wallet.committed,
            slow_wallet.pending,
            slow_wallet.reserved,
        )
    assert billing.holds_open == 0
    await billing.writer.posted()
    async with books.engine.connect() as conn:
        rows = {row.job_id: row for row in await conn.execute(select(charges))}
        found = {
            row.book: row.amount_micros
            for row in await conn.execute(
                select(balances).where(
                    balances.c.book.in_(
                        [
                            developer_book(fast_id),
                            developer_book(slow_id),
                            developer_book(fast_id, sandbox=True),
                            developer_book(slow_id, sandbox=True),
                        ]
                    )
                )
            )
        }
    for n in range(len(CASES)):
        fast_row, slow_row = rows[f"fast{n}"], rows[f"slow{n}"]
        for column in CHARGE_COLUMNS:
            if column in PER_CHARGE:
                continue
            assert getattr(fast_row, column) == getattr(slow_row, column), (n, column)
    assert found[developer_book(fast_id)] == found[developer_book(slow_id)] < CREDIT
    assert (
        found[developer_book(fast_id, sandbox=True)]
        == found[developer_book(slow_id, sandbox=True)]
        < CREDIT
    )
    # A charge split 85/15 put money in the provider's and the platform's books.
    earned = await billing.ledger.book_balances([provider_book(books.provider), PLATFORM_REVENUE])
    assert earned[provider_book(books.provider)] > 0 and earned[PLATFORM_REVENUE] > 0


async def test_hold_now_declines_and_reserves_nothing_where_the_general_path_is_needed(
    books: Books,
) -> None:
    billing = books.billing
    account_id = await developer(books)
    who = Principal(account_id, None, "live")
    # Not loaded yet: the general path reads the balance first.
    assert billing.hold_now(who, "m", DEAR, 100, "job_a") is None
    await loaded(books, who)
    wallet = billing._wallets[account_id, False]
    # More than is available: the general path re-reads the balance before a 402.
    assert billing.hold_now(who, "m", DEAR, CREDIT + 1, "job_b") is None
    # A key with a daily cap: the general path counts its spend.
    capped = Principal(account_id, "key_1", "live", KeySettings(daily_spend_cap_micros=10**6))
    assert billing.hold_now(capped, "m", DEAR, 100, "job_c") is None
    assert wallet.reserved == 0 and billing.holds_open == 0
    # A hold is whole micro-dollars, never a float.
    with pytest.raises(ValueError, match="micros"):
        billing.hold_now(who, "m", DEAR, 1.5, "job_d")  # type: ignore[arg-type]
    hold = billing.hold_now(who, "m", DEAR, 100, "job_e")
    assert hold is not None and wallet.reserved == 100 and billing.holds_open == 1


async def test_settle_now_declines_ledger_holds_and_a_stopped_writer(books: Books) -> None:
    billing = books.billing
    who = Principal(await developer(books), None, "live")
    await loaded(books, who)
    queued = await billing.hold(
        who, model="m", pricing=DEAR, amount_micros=100, job_id="job_q", in_ledger=True
    )
    assert billing.settle_now(queued, 1, 1, "dev_1", books.provider, "m", DEAR) is None
    assert not queued.resolved
    charge = await billing.settle(
        queued,
        prompt_tokens=1,
        completion_tokens=1,
        device_id="dev_1",
        provider_account_id=books.provider,
    )
    assert charge.charged_micros == 3
    hold = billing.hold_now(who, "m", DEAR, 100, "job_r")
    assert hold is not None
    await billing.writer.stop()
    assert billing.settle_now(hold, 1, 1, "dev_1", books.provider, "m", DEAR) is None
    assert not hold.resolved
    # The general path then refuses it: nothing charged, the reservation given back.
    with pytest.raises(BillingUnavailable):
        await billing.settle(
            hold,
            prompt_tokens=1,
            completion_tokens=1,
            device_id="dev_1",
            provider_account_id=books.provider,
        )
    assert hold.wallet is not None and hold.wallet.reserved == 0


async def test_a_refused_append_charges_nothing_and_a_hold_settles_once(
    books: Books, monkeypatch: pytest.MonkeyPatch
) -> None:
    billing = books.billing
    who = Principal(await developer(books), None, "live")
    await loaded(books, who)
    wallet = billing._wallets[who.account_id, False]
    before = wallet.committed
    journal = billing.writer.journal
    assert journal is not None

    def refuse(charge: object) -> None:
        raise ChargeRefused("journal write failed")

    monkeypatch.setattr(journal, "append", refuse)
    hold = billing.hold_now(who, "m", DEAR, 1_000, "job_x")
    assert hold is not None
    with pytest.raises(BillingUnavailable, match="not charged"):
        billing.settle_now(hold, 10, 10, "dev_1", books.provider, "m", DEAR)
    assert (wallet.committed, wallet.pending, wallet.reserved) == (before, 0, 0)
    assert billing.holds_open == 0
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="already resolved"):
        billing.settle_now(hold, 10, 10, "dev_1", books.provider, "m", DEAR)
    again = billing.hold_now(who, "m", DEAR, 1_000, "job_y")
    assert again is not None
    charge = billing.settle_now(again, 10, 10, "dev_1", books.provider, "m", DEAR)
    assert charge is not None and charge.charged_micros == 30
    assert (charge.provider_micros, charge.platform_micros) == (25, 5)
    assert wallet.committed == before - 30 and wallet.reserved == 0
    await billing.writer.posted()
    async with books.engine.connect() as conn:
        job_ids = set((await conn.execute(select(charges.c.job_id))).scalars())
    assert "job_y" in job_ids and "job_x" not in job_ids
