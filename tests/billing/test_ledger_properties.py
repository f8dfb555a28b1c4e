"""Ledger and payouts as a hypothesis state machine against a real SQLite file.

Random sequences of top-ups, holds, settlements, voids, expiry sweeps, races of several
resolutions on one hold, payout requests and decisions and welcome bonuses run against
the real ledger while a plain-Python model predicts every outcome. After every step the
raw tables are checked for the ledger's promises and compared with the model.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    MultipleResults,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import false, func, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from swarmgate.billing.ledger import (
    EXTERNAL_PAYOUTS,
    Ledger,
    developer_book,
    holds_book,
    provider_book,
)
from swarmgate.billing.payouts import (
    EXTERNAL_BONUSES,
    Payouts,
    PayoutStatus,
    pending_payouts_book,
)
from swarmgate.billing.pricing import split_earnings
from swarmgate.errors import BillingError, IllegalTransition, InsufficientCredits, RequestError
from swarmgate.store.db import create_engine, migrate
from swarmgate.store.tables import (
    accounts,
    balances,
    holds,
    ledger_entries,
    ledger_transactions,
    payouts,
)

T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
DEVELOPERS = ("acct_dev_a", "acct_dev_b")
PROVIDERS = ("acct_prov_a", "acct_prov_b")
THRESHOLD = 100
BONUS = 700
LOCK_DAYS = 1
RESOLUTION_KINDS = ("settle", "void", "expire")


class Clock:
    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


# -- the ledger's promises, checked from the raw tables ----------------------------------
async def check_ledger(engine: AsyncEngine) -> dict[str, int]:
    """Asserts every invariant that needs no model; returns the non-zero balances."""
    async with engine.connect() as conn:
        unbalanced = (
            await conn.execute(
                select(ledger_entries.c.transaction_id)
                .group_by(ledger_entries.c.transaction_id)
                .having(func.sum(ledger_entries.c.amount_micros) != 0)
            )
        ).all()
        assert unbalanced == [], "a transaction's entries do not sum to zero"
        table = {
            book: int(amount)
            for book, amount in await conn.execute(
                select(balances.c.book, balances.c.amount_micros)
            )
        }
        from_entries = {
            book: int(amount)
            for book, amount in await conn.execute(
                select(ledger_entries.c.book, func.sum(ledger_entries.c.amount_micros)).group_by(
                    ledger_entries.c.book
                )
            )
        }
        nonzero = {book: amount for book, amount in table.items() if amount}
        assert nonzero == {b: a for b, a in from_entries.items() if a}, "balances drifted"
        assert sum(table.values()) == 0, "money was created or destroyed"
        negative = {b: a for b, a in table.items() if a < 0 and not b.startswith("external:")}
        assert negative == {}, f"books below zero: {negative}"
        await _check_holds(conn, nonzero)
        await _check_payouts(conn, nonzero)
    return nonzero


async def _check_holds(conn: AsyncConnection, books: dict[str, int]) -> None:
    resolutions = {
        hold_id: count
        for hold_id, count in await conn.execute(
            select(ledger_transactions.c.hold_id, func.count())
            .where(ledger_transactions.c.kind.in_(RESOLUTION_KINDS))
            .group_by(ledger_transactions.c.hold_id)
        )
    }
    open_per_book: dict[str, int] = {}
    for hold in await conn.execute(select(holds)):
        resolved = resolutions.get(hold.id, 0)
        assert resolved == (0 if hold.status == "open" else 1), (hold.id, hold.status, resolved)
        if hold.status == "open":
            book = holds_book(hold.account_id, sandbox=hold.sandbox)
            open_per_book[book] = open_per_book.get(book, 0) + int(hold.amount_micros)
    held = {b: a for b, a in books.items() if b.startswith(("holds:", "sandbox:holds:"))}
    assert held == {b: a for b, a in open_per_book.items() if a}, "holds books != open holds"


async def _check_payouts(conn: AsyncConnection, books: dict[str, int]) -> None:
    open_per_book: dict[str, int] = {}
    paid = 0
    for payout in await conn.execute(select(payouts)):
        if PayoutStatus(payout.status).open:
            book = pending_payouts_book(payout.account_id)
            open_per_book[book] = open_per_book.get(book, 0) + int(payout.amount_micros)
        elif payout.status == PayoutStatus.PAID:
            paid += int(payout.amount_micros)
    pending = {b: a for b, a in books.items() if b.startswith("payouts:pending:")}
    assert pending == {b: a for b, a in open_per_book.items() if a}, "pending != open payouts"
    assert books.get(EXTERNAL_PAYOUTS, 0) == paid, "external:payouts != paid payouts"


async def developer_accounting(engine: AsyncEngine) -> dict[str, tuple[int, int]]:
    """Per developer, (topped up, spent) from the raw tables: what went in, and what
    settled jobs charged."""
    async with engine.connect() as conn:
        topped = dict(
            (
                await conn.execute(
                    select(ledger_entries.c.book, func.sum(ledger_entries.c.amount_micros))
                    .join(
                        ledger_transactions,
                        ledger_transactions.c.id == ledger_entries.c.transaction_id,
                    )
                    .where(
                        ledger_transactions.c.kind == "top_up",
                        ledger_entries.c.book.like("developer:%"),
                    )
                    .group_by(ledger_entries.c.book)
                )
            ).all()
        )
        spent = dict(
            (
                await conn.execute(
                    select(holds.c.account_id, func.sum(holds.c.charged_micros))
                    .where(holds.c.status == "settled", holds.c.sandbox == false())
                    .group_by(holds.c.account_id)
                )
            ).all()
        )
    accounts_seen = {book.removeprefix("developer:") for book in topped} | set(spent)
    return {
        account: (int(topped.get(developer_book(account), 0)), int(spent.get(account, 0)))
        for account in accounts_seen
    }


# -- the model ---------------------------------------------------------------------------
@dataclass
class ModelHold:
    account_id: str
    amount: int
    expires_at: datetime
    status: str = "open"


@dataclass
class ModelPayout:
    account_id: str
    amount: int
    status: PayoutStatus = PayoutStatus.REQUESTED


async def _build_template(path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    try:
        await migrate(engine)
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
                    for i in (*DEVELOPERS, *PROVIDERS)
                ],
            )
    finally:
        await engine.dispose()


amounts = st.integers(0, 4_000)
shares = st.sampled_from([0, 1, 8_500, 10_000])
steps = st.sampled_from(["approve", "reject", "paid", "cancel"])


class LedgerMachine(RuleBasedStateMachine):
    hold_ids = Bundle("hold_ids")
    payout_ids = Bundle("payout_ids")

    template: Path  # a migrated database with the accounts, copied for every example

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="example-", dir=self.template.parent))
        shutil.copyfile(self.template, self.dir / "ledger.db")
        self.loop = asyncio.new_event_loop()
        self.engine = create_engine(f"sqlite+aiosqlite:///{self.dir / 'ledger.db'}")
        self.clock = Clock()
        self.ledger = Ledger(self.engine, clock=self.clock)
        self.payouts = Payouts(
            self.engine, threshold_micros=THRESHOLD, bonus_lock_days=LOCK_DAYS, clock=self.clock
        )
        self.available = dict.fromkeys(DEVELOPERS, 0)
        self.topped = dict.fromkeys(DEVELOPERS, 0)
        self.spent = dict.fromkeys(DEVELOPERS, 0)
        self.earned = dict.fromkeys(PROVIDERS, 0)  # the provider book
        self.bonus_at: dict[str, datetime] = {}
        self.holds: dict[str, ModelHold] = {}
        self.payouts_model: dict[str, ModelPayout] = {}

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    def teardown(self) -> None:
        self.run(self.engine.dispose())
        self.loop.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- model helpers -------------------------------------------------------------------
    def held(self, account_id: str) -> int:
        return sum(
            h.amount
            for h in self.holds.values()
            if h.account_id == account_id and h.status == "open"
        )

    def pending(self, account_id: str) -> int:
        return sum(
            p.amount
            for p in self.payouts_model.values()
            if p.account_id == account_id and p.status.open
        )

    def withdrawable(self, account_id: str) -> int:
        granted = self.bonus_at.get(account_id)
        locked = BONUS if granted and self.clock.now < granted + timedelta(days=LOCK_DAYS) else 0
        return max(0, self.earned[account_id] - locked)

    def settle_in_model(self, hold_id: str, cost: int, provider: str, bps: int) -> int:
        hold = self.holds[hold_id]
        charged = min(cost, hold.amount)
        hold.status = "settled"
        self.available[hold.account_id] += hold.amount - charged
        self.spent[hold.account_id] += charged
        self.earned[provider] += split_earnings(charged, bps)[0]
        return charged

    def release_in_model(self, hold_id: str, status: str) -> None:
        hold = self.holds[hold_id]
        hold.status = status
        self.available[hold.account_id] += hold.amount

    def due(self) -> list[str]:
        return [
            i
            for i, h in self.holds.items()
            if h.status == "open" and h.expires_at <= self.clock.now
        ]

    # -- developer money -----------------------------------------------------------------
    # Every history starts from some credit, earnings and open payout requests, so the
    # rules that need them are not left waiting for the random ones to build them up.
    @initialize(
        target=payout_ids,
        credit=st.tuples(st.integers(0, 20_000), st.integers(0, 20_000)),
        earned=st.tuples(st.integers(0, 5_000), st.integers(0, 5_000)),
        percent=st.integers(0, 120),
    )
    def opening_books(
        self, credit: tuple[int, int], earned: tuple[int, int], percent: int
    ) -> MultipleResults[str]:
        for account, amount in zip(DEVELOPERS, credit, strict=True):
            if amount:
                self.top_up(account, amount)
        requested: list[str] = []
        for provider, cost in zip(PROVIDERS, earned, strict=True):
            if cost:
                self.top_up(DEVELOPERS[0], cost)
                hold_id = self.hold(DEVELOPERS[0], cost, 120)
                assert isinstance(hold_id, str)
                self.settle(hold_id, cost, provider, 8_500)
            payout_id = self.request_payout(provider, percent)
            if isinstance(payout_id, str):
                requested.append(payout_id)
        return multiple(*requested)

    @rule(account=st.sampled_from(DEVELOPERS), amount=st.integers(1, 6_000))
    def top_up(self, account: str, amount: int) -> None:
        self.run(self.ledger.top_up(account, amount, "test"))
        self.available[account] += amount
        self.topped[account] += amount

    @rule(
        target=hold_ids,
        account=st.sampled_from(DEVELOPERS),
        amount=amounts,
        ttl=st.integers(1, 120),
    )
    def hold(self, account: str, amount: int, ttl: int) -> str | MultipleResults[str]:
        try:
            hold_id: str = self.run(self.ledger.hold(account, amount, None, ttl_s=ttl))
        except InsufficientCredits:
            assert amount > self.available[account]
            return multiple()  # nothing for later rules to pick
        assert amount <= self.available[account]
        self.available[account] -= amount
        self.holds[hold_id] = ModelHold(account, amount, self.clock.now + timedelta(seconds=ttl))
        return hold_id

    @rule(hold_id=hold_ids, cost=amounts, provider=st.sampled_from(PROVIDERS), bps=shares)
    def settle(self, hold_id: str, cost: int, provider: str, bps: int) -> None:
        if hold_id not in self.holds:
            return
        was_open = self.holds[hold_id].status == "open"
        try:
            settlement = self.run(self.ledger.settle(hold_id, cost, provider, bps))
        except BillingError as exc:
            refusal = exc.code
        else:
            assert was_open
            assert settlement.charged_micros == self.settle_in_model(hold_id, cost, provider, bps)
            return
        assert (refusal, was_open) == ("HOLD_NOT_OPEN", False)

    @rule(hold_id=hold_ids)
    def void(self, hold_id: str) -> None:
        if hold_id not in self.holds:
            return
        voided = self.run(self.ledger.void(hold_id))
        assert voided == (self.holds[hold_id].status == "open")
        if voided:
            self.release_in_model(hold_id, "voided")

    # Mostly seconds (holds live 1-120 s); now and then a whole day, past the bonus lock.
    @rule(seconds=st.one_of(st.integers(0, 150), st.just(86_400)))
    def advance_clock(self, seconds: int) -> None:
        self.clock.now += timedelta(seconds=seconds)

    @rule()
    def sweep(self) -> None:
        due = self.due()
        assert self.run(self.ledger.expire_holds()) == len(due)
        for hold_id in due:
            self.release_in_model(hold_id, "expired")

    @rule(
        hold_id=hold_ids,
        settlers=st.integers(0, 4),
        voiders=st.integers(0, 4),
        cost=amounts,
        provider=st.sampled_from(PROVIDERS),
    )
    def race_to_resolve(
        self, hold_id: str, settlers: int, voiders: int, cost: int, provider: str
    ) -> None:
        """Settles, voids and a sweep racing on one hold: exactly one resolves it."""
        if hold_id not in self.holds or self.holds[hold_id].status != "open":
            return
        others_due = [i for i in self.due() if i != hold_id]

        async def race() -> list[Any]:
            return await asyncio.gather(
                *(self.ledger.settle(hold_id, cost, provider) for _ in range(settlers)),
                *(self.ledger.void(hold_id) for _ in range(voiders)),
                self.ledger.expire_holds(),
                return_exceptions=True,
            )

        results = self.run(race())
        swept = results[-1]
        settled = [r for r in results[:settlers] if not isinstance(r, BaseException)]
        refused = [r for r in results[:settlers] if isinstance(r, BaseException)]
        assert all(isinstance(r, BillingError) and r.code == "HOLD_NOT_OPEN" for r in refused)
        voided = [r for r in results[settlers:-1] if r is True]
        assert not isinstance(swept, BaseException), swept
        expired_it = swept - len(others_due)
        assert expired_it in (0, 1)
        winners = len(settled) + len(voided) + expired_it
        was_due = self.holds[hold_id].expires_at <= self.clock.now
        assert winners == (1 if settlers or voiders or was_due else 0), results
        for other in others_due:
            self.release_in_model(other, "expired")
        if settled:
            self.settle_in_model(hold_id, cost, provider, 8_500)
        elif voided:
            self.release_in_model(hold_id, "voided")
        elif expired_it:
            self.release_in_model(hold_id, "expired")

    # -- providers' money ----------------------------------------------------------------
    @rule(provider=st.sampled_from(PROVIDERS))
    def grant_bonus(self, provider: str) -> None:
        self.run(self.payouts.grant_bonus(provider, BONUS))
        if provider not in self.bonus_at:
            self.bonus_at[provider] = self.clock.now
            self.earned[provider] += BONUS

    # Amounts around what can be withdrawn right now, so requests succeed as often as not;
    # 0 % stands for an amount below the threshold.
    @rule(target=payout_ids, provider=st.sampled_from(PROVIDERS), percent=st.integers(0, 120))
    def request_payout(self, provider: str, percent: int) -> str | MultipleResults[str]:
        withdrawable = self.withdrawable(provider)
        amount = THRESHOLD - 1 if percent == 0 else max(1, withdrawable * percent // 100)
        return self._request(provider, amount)

    def _request(self, provider: str, amount: int) -> str | MultipleResults[str]:
        funds = self.run(self.payouts.funds(provider))
        assert funds.withdrawable_micros == self.withdrawable(provider)
        if amount < THRESHOLD:
            expected: str | None = "PAYOUT_BELOW_THRESHOLD"
        elif amount > self.withdrawable(provider):
            expected = "INSUFFICIENT_EARNINGS"
        else:
            expected = None
        refusal: str | None = None
        try:
            payout = self.run(self.payouts.request(provider, amount))
        except (RequestError, BillingError) as exc:
            refusal = exc.code
        assert refusal == expected
        if refusal is not None:
            return multiple()
        self.earned[provider] -= amount
        self.payouts_model[payout.id] = ModelPayout(provider, amount)
        return str(payout.id)

    @rule(payout_id=payout_ids, step=steps)
    def decide_payout(self, payout_id: str, step: str) -> None:
        if payout_id not in self.payouts_model:
            return
        model = self.payouts_model[payout_id]
        target = {
            "approve": PayoutStatus.APPROVED,
            "reject": PayoutStatus.REJECTED,
            "paid": PayoutStatus.PAID,
            "cancel": PayoutStatus.CANCELLED,
        }[step]
        legal = {
            PayoutStatus.REQUESTED: {
                PayoutStatus.APPROVED,
                PayoutStatus.REJECTED,
                PayoutStatus.CANCELLED,
            },
            PayoutStatus.APPROVED: {PayoutStatus.PAID},
        }.get(model.status, set())
        try:
            self.run(self._step(payout_id, model.account_id, step))
        except IllegalTransition:
            assert target not in legal
            return
        assert target in legal
        model.status = target
        if target in (PayoutStatus.REJECTED, PayoutStatus.CANCELLED):
            self.earned[model.account_id] += model.amount

    @rule(payout_id=payout_ids)
    def advance_payout(self, payout_id: str) -> None:
        """The admin's happy path, one step: approve a request, pay an approved payout."""
        model = self.payouts_model.get(payout_id)
        if model is not None and model.status is PayoutStatus.REQUESTED:
            self.decide_payout(payout_id, "approve")
        elif model is not None and model.status is PayoutStatus.APPROVED:
            self.decide_payout(payout_id, "paid")

    def _step(self, payout_id: str, account_id: str, step: str) -> Any:
        if step == "approve":
            return self.payouts.approve(payout_id)
        if step == "reject":
            return self.payouts.reject(payout_id, "no")
        if step == "paid":
            return self.payouts.mark_paid(payout_id)
        return self.payouts.cancel(account_id, payout_id)

    @rule(payout_id=consumes(payout_ids))
    def race_to_decide(self, payout_id: str) -> None:
        """Approve, reject and cancel racing on one request: exactly one decides it."""
        model = self.payouts_model.get(payout_id)
        if model is None or model.status is not PayoutStatus.REQUESTED:
            return

        async def race() -> list[Any]:
            return await asyncio.gather(
                *(
                    self._step(payout_id, model.account_id, s)
                    for s in ("approve", "reject", "cancel")
                ),
                return_exceptions=True,
            )

        results = self.run(race())
        won = [r for r in results if not isinstance(r, BaseException)]
        assert len(won) == 1, results
        assert all(isinstance(r, IllegalTransition) for r in results if r not in won)
        model.status = won[0].status
        if model.status is not PayoutStatus.APPROVED:
            self.earned[model.account_id] += model.amount

    # -- after every step ----------------------------------------------------------------
    @invariant()
    def books_agree(self) -> None:
        books = self.run(check_ledger(self.engine))
        accounting = self.run(developer_accounting(self.engine))
        for account in DEVELOPERS:
            available = books.get(developer_book(account), 0)
            held = books.get(holds_book(account), 0)
            assert (available, held) == (self.available[account], self.held(account))
            topped, spent = accounting.get(account, (0, 0))
            assert (topped, spent) == (self.topped[account], self.spent[account])
            assert available + held + spent == topped
        for provider in PROVIDERS:
            assert books.get(provider_book(provider), 0) == self.earned[provider]
            assert books.get(pending_payouts_book(provider), 0) == self.pending(provider)
        assert -books.get(EXTERNAL_BONUSES, 0) == BONUS * len(self.bonus_at)

    @precondition(lambda self: bool(self.holds))
    @invariant()
    def hold_statuses_match_the_model(self) -> None:
        async def statuses() -> dict[str, str]:
            async with self.engine.connect() as conn:
                return dict((await conn.execute(select(holds.c.id, holds.c.status))).all())

        assert self.run(statuses()) == {i: h.status for i, h in self.holds.items()}


def test_random_ledger_and_payout_histories_keep_every_invariant(tmp_path: Path) -> None:
    LedgerMachine.template = tmp_path / "template.db"
    asyncio.run(_build_template(LedgerMachine.template))
    run_state_machine_as_test(
        LedgerMachine,
        settings=settings(
            max_examples=40,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
