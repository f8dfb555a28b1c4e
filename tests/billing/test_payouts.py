"""Payouts and the provider welcome bonus: the state machine, the money, the endpoints."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from swarmgate.accounts import service
from swarmgate.accounts.keys import KeyMode
from swarmgate.billing.ledger import EXTERNAL_PAYOUTS
from swarmgate.billing.payouts import (
    EXTERNAL_BONUSES,
    Payouts,
    PayoutStatus,
    check_payout_transition,
    grant_provider_bonus,
    pending_payouts_book,
    transition_postings,
)
from swarmgate.errors import BillingError, IllegalTransition, NotFound, RequestError
from swarmgate.store.tables import ledger_transactions, payouts
from tests.billing.test_earnings import record_job
from tests.billing.test_ledger_properties import check_ledger
from tests.billing.test_ledger_race import sqlite_engine
from tests.conftest import ADMIN_TOKEN, LiveGateway

T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
THRESHOLD = 5_000_000
S = PayoutStatus


class Clock:
    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


# -- the state machine: pure ----------------------------------------------------------------
LEGAL = {
    (S.REQUESTED, S.APPROVED),
    (S.REQUESTED, S.REJECTED),
    (S.REQUESTED, S.CANCELLED),
    (S.APPROVED, S.PAID),
}


@pytest.mark.parametrize(("current", "target"), list(itertools.product(S, S)))
def test_every_payout_transition(current: PayoutStatus, target: PayoutStatus) -> None:
    if (current, target) in LEGAL:
        check_payout_transition(current, target)
    else:
        with pytest.raises(IllegalTransition, match=f"from '{current}' to '{target}'"):
            check_payout_transition(current, target)


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (S.APPROVED, {}),
        (S.PAID, {"payouts:pending:p": -700, EXTERNAL_PAYOUTS: 700}),
        (S.REJECTED, {"payouts:pending:p": -700, "provider:p": 700}),
        (S.CANCELLED, {"payouts:pending:p": -700, "provider:p": 700}),
    ],
)
def test_transition_postings(target: PayoutStatus, expected: dict[str, int]) -> None:
    assert dict(transition_postings("p", 700, target)) == expected


def test_pending_book_refuses_a_colon() -> None:
    with pytest.raises(ValueError, match="not an account id"):
        pending_payouts_book("a:b")


# -- against a real SQLite file -------------------------------------------------------------
@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    async with sqlite_engine(tmp_path / "payouts.db") as engine:
        yield engine


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def book(engine: AsyncEngine, clock: Clock) -> Payouts:
    return Payouts(engine, threshold_micros=THRESHOLD, bonus_lock_days=30, clock=clock)


async def earning_provider(engine: AsyncEngine, earned: int) -> str:
    """A provider account that earned ``earned`` micro-dollars (85 % of the jobs' cost)."""
    developer = await service.create_account(engine, name="dev")
    provider = await service.create_account(engine, name="prov", developer=False, provider=True)
    cost = earned * 10_000 // 8_500
    assert cost * 8_500 // 10_000 == earned, "pick an amount 85 % of a whole cost"
    await record_job(
        engine, developer=developer["id"], provider=provider["id"], device_id=None, cost=cost,
        when=T0,
    )  # fmt: skip
    return str(provider["id"])


async def test_request_sets_the_amount_aside(engine: AsyncEngine, book: Payouts) -> None:
    provider = await earning_provider(engine, 17_000_000)
    payout = await book.request(provider, 6_000_000, destination="iban:DE00 1234")
    assert payout.status is S.REQUESTED
    assert (payout.amount_micros, payout.destination) == (6_000_000, "iban:DE00 1234")
    assert payout.created_at == T0 and payout.decided_at is None and payout.paid_at is None
    funds = await book.funds(provider)
    assert (funds.balance_micros, funds.pending_micros, funds.paid_micros) == (
        11_000_000,
        6_000_000,
        0,
    )
    assert funds.withdrawable_micros == 11_000_000
    books = await check_ledger(engine)
    assert books[pending_payouts_book(provider)] == 6_000_000


async def test_approve_then_paid(engine: AsyncEngine, book: Payouts, clock: Clock) -> None:
    provider = await earning_provider(engine, 17_000_000)
    requested = await book.request(provider, 17_000_000)
    clock.now += timedelta(hours=1)
    approved = await book.approve(requested.id, note="looks right")
    assert approved.status is S.APPROVED
    assert approved.decided_at == T0 + timedelta(hours=1)
    assert approved.transaction_id == requested.transaction_id  # no money moved
    clock.now += timedelta(hours=1)
    paid = await book.mark_paid(requested.id, note="wire ref 42")
    assert (paid.status, paid.note, paid.paid_at) == (S.PAID, "wire ref 42", clock.now)
    assert paid.transaction_id != requested.transaction_id
    funds = await book.funds(provider)
    assert (funds.balance_micros, funds.pending_micros, funds.paid_micros) == (0, 0, 17_000_000)
    books = await check_ledger(engine)
    assert books[EXTERNAL_PAYOUTS] == 17_000_000


@pytest.mark.parametrize("step", ["reject", "cancel"])
async def test_reject_or_cancel_gives_the_money_back(
    engine: AsyncEngine, book: Payouts, step: str
) -> None:
    provider = await earning_provider(engine, 17_000_000)
    payout = await book.request(provider, 8_500_000)
    if step == "reject":
        decided = await book.reject(payout.id, note="destination unknown")
        assert (decided.status, decided.note) == (S.REJECTED, "destination unknown")
    else:
        decided = await book.cancel(provider, payout.id)
        assert decided.status is S.CANCELLED
    funds = await book.funds(provider)
    assert (funds.balance_micros, funds.pending_micros) == (17_000_000, 0)
    await check_ledger(engine)
    # The money is withdrawable again, in full.
    assert (await book.request(provider, 17_000_000)).status is S.REQUESTED


async def test_below_threshold_and_beyond_earnings_write_nothing(
    engine: AsyncEngine, book: Payouts
) -> None:
    provider = await earning_provider(engine, 17_000_000)
    with pytest.raises(RequestError) as low:
        await book.request(provider, THRESHOLD - 1)
    assert (low.value.status_code, low.value.code) == (400, "PAYOUT_BELOW_THRESHOLD")
    with pytest.raises(BillingError) as high:
        await book.request(provider, 17_000_001)
    assert (high.value.status_code, high.value.code) == (402, "INSUFFICIENT_EARNINGS")
    assert "17000000 can be withdrawn" in high.value.message
    with pytest.raises(TypeError):
        await book.request(provider, 6_000_000.0)  # type: ignore[arg-type]
    async with engine.connect() as conn:
        assert await conn.scalar(select(func.count()).select_from(payouts)) == 0
    assert (await book.funds(provider)).balance_micros == 17_000_000


async def test_a_payout_for_an_unknown_account(book: Payouts) -> None:
    with pytest.raises(NotFound):
        await book.request("acct_nobody", THRESHOLD)


@pytest.mark.parametrize(
    ("path", "illegal"),
    [
        ([], "paid"),
        (["approve"], "approve"),
        (["approve"], "reject"),
        (["approve"], "cancel"),
        (["reject"], "approve"),
        (["reject"], "cancel"),
        (["cancel"], "reject"),
        (["approve", "paid"], "paid"),
        (["approve", "paid"], "reject"),
        (["approve", "paid"], "cancel"),
    ],
)
async def test_illegal_steps_change_nothing(
    engine: AsyncEngine, book: Payouts, path: list[str], illegal: str
) -> None:
    provider = await earning_provider(engine, 17_000_000)
    payout = await book.request(provider, 10_000_000)

    def step(name: str) -> Any:
        if name == "cancel":
            return book.cancel(provider, payout.id)
        return {"approve": book.approve, "reject": book.reject, "paid": book.mark_paid}[name](
            payout.id
        )

    for name in path:
        await step(name)
    before = await book.get(payout.id)
    funds_before = await book.funds(provider)
    with pytest.raises(IllegalTransition):
        await step(illegal)
    assert await book.get(payout.id) == before
    assert await book.funds(provider) == funds_before
    await check_ledger(engine)


async def test_only_the_owner_sees_or_cancels_a_payout(engine: AsyncEngine, book: Payouts) -> None:
    provider = await earning_provider(engine, 17_000_000)
    stranger = await earning_provider(engine, 17_000_000)
    payout = await book.request(provider, 10_000_000)
    with pytest.raises(NotFound):
        await book.cancel(stranger, payout.id)
    with pytest.raises(NotFound):
        await book.get(payout.id, owner=stranger)
    with pytest.raises(NotFound):
        await book.approve("po_missing")
    assert (await book.get(payout.id, owner=provider)).status is S.REQUESTED


async def test_listing_filters_and_orders(engine: AsyncEngine, book: Payouts, clock: Clock) -> None:
    provider = await earning_provider(engine, 34_000_000)
    other = await earning_provider(engine, 17_000_000)
    made = []
    for account in (provider, other, provider):
        made.append(await book.request(account, THRESHOLD))
        clock.now += timedelta(minutes=1)
    await book.approve(made[0].id)
    mine = await book.list_payouts(account_id=provider)
    assert [p.id for p in mine] == [made[2].id, made[0].id]  # newest first
    approved = await book.list_payouts(status=S.APPROVED)
    assert [p.id for p in approved] == [made[0].id]
    assert len(await book.list_payouts()) == 3
    assert len(await book.list_payouts(limit=1)) == 1


# -- the welcome bonus ----------------------------------------------------------------------
async def test_bonus_is_granted_once_and_locked(
    engine: AsyncEngine, book: Payouts, clock: Clock
) -> None:
    provider = await earning_provider(engine, 17_000_000)
    first = await book.grant_bonus(provider, 10_000_000)
    again = await book.grant_bonus(provider, 10_000_000)
    assert first is not None and again == first
    funds = await book.funds(provider)
    assert funds.balance_micros == 27_000_000
    assert (funds.bonus_micros, funds.bonus_locked_micros) == (10_000_000, 10_000_000)
    assert funds.bonus_unlocks_at == T0 + timedelta(days=30)
    assert funds.withdrawable_micros == 17_000_000
    with pytest.raises(BillingError, match="unlocks at"):
        await book.request(provider, 17_000_001)
    await book.request(provider, 17_000_000)
    assert (await book.funds(provider)).withdrawable_micros == 0

    clock.now = T0 + timedelta(days=30)
    unlocked = await book.funds(provider)
    assert (unlocked.bonus_locked_micros, unlocked.withdrawable_micros) == (0, 10_000_000)
    await book.request(provider, 10_000_000)
    books = await check_ledger(engine)
    assert books[EXTERNAL_BONUSES] == -10_000_000
    assert books.get(f"provider:{provider}", 0) == 0


async def test_bonus_off_and_bad_accounts(engine: AsyncEngine, book: Payouts) -> None:
    provider = await earning_provider(engine, 17_000_000)
    assert await book.grant_bonus(provider, 0) is None
    assert (await book.funds(provider)).bonus_micros == 0
    with pytest.raises(NotFound):
        await book.grant_bonus("acct_nobody", 1_000)
    async with engine.begin() as conn:
        with pytest.raises(RequestError):
            await grant_provider_bonus(conn, provider, amount_micros=-5, now=T0)


async def test_the_first_device_brings_the_bonus(engine: AsyncEngine, book: Payouts) -> None:
    account = await service.create_account(engine, name="new provider", developer=False)
    await service.create_device(engine, account_id=account["id"], welcome_bonus_micros=2_000_000)
    await service.create_device(engine, account_id=account["id"], welcome_bonus_micros=2_000_000)
    funds = await book.funds(account["id"])
    assert (funds.balance_micros, funds.bonus_locked_micros) == (2_000_000, 2_000_000)
    async with engine.connect() as conn:
        grants = await conn.scalar(
            select(func.count())
            .select_from(ledger_transactions)
            .where(ledger_transactions.c.kind == "provider_bonus")
        )
    assert grants == 1
    await check_ledger(engine)


# -- the endpoints --------------------------------------------------------------------------
async def _provider(live: LiveGateway, earned: int, mode: KeyMode = "live") -> tuple[str, str]:
    provider = await earning_provider(live.gateway.engine, earned)
    key = await service.create_api_key(live.gateway.engine, account_id=provider, mode=mode)
    return provider, key.secret


async def test_payout_lifecycle_over_http(live: LiveGateway) -> None:
    _, key = await _provider(live, 17_000_000)
    async with live.client(key) as client, live.client(ADMIN_TOKEN) as admin:
        created = await client.post(
            "/v1/provider/payouts", json={"amount_usd": "6.5", "destination": "paypal:me@x.org"}
        )
        assert created.status_code == 201, created.text
        payout = created.json()
        assert payout["object"] == "payout"
        assert (payout["amount_micros"], payout["amount_usd"]) == (6_500_000, "6.500000")
        assert (payout["status"], payout["destination"]) == ("requested", "paypal:me@x.org")

        whole = await client.post("/v1/provider/payouts", json={"amount_usd": 6})
        assert whole.json()["amount_micros"] == 6_000_000
        listed = await client.get("/v1/provider/payouts")
        assert [p["id"] for p in listed.json()["data"]] == [whole.json()["id"], payout["id"]]
        assert (await client.get(f"/v1/provider/payouts/{payout['id']}")).json() == payout

        earnings = (await client.get("/v1/provider/earnings")).json()
        assert earnings["pending_payouts_micros"] == 12_500_000
        assert earnings["balance_micros"] == earnings["withdrawable_micros"] == 4_500_000

        cancelled = await client.post(f"/v1/provider/payouts/{whole.json()['id']}/cancel")
        assert cancelled.json()["status"] == "cancelled"

        queue = await admin.get("/admin/payouts", params={"status": "requested"})
        assert [p["id"] for p in queue.json()["data"]] == [payout["id"]]
        approved = await admin.post(f"/admin/payouts/{payout['id']}/approve")
        assert approved.status_code == 200, approved.text
        assert approved.json()["status"] == "approved"
        paid = await admin.post(f"/admin/payouts/{payout['id']}/paid", json={"note": "ref 7"})
        assert (paid.json()["status"], paid.json()["note"]) == ("paid", "ref 7")

        again = await admin.post(f"/admin/payouts/{payout['id']}/reject")
        assert again.status_code == 409
        assert again.json()["error"]["code"] == "CONFLICT"
        late_cancel = await client.post(f"/v1/provider/payouts/{payout['id']}/cancel")
        assert late_cancel.status_code == 409

        earnings = (await client.get("/v1/provider/earnings")).json()
        assert earnings["paid_out_micros"] == 6_500_000
        assert earnings["pending_payouts_micros"] == 0
        assert earnings["withdrawable_micros"] == 10_500_000
    await check_ledger(live.gateway.engine)


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        ({"amount_micros": 4_999_999}, 400, "PAYOUT_BELOW_THRESHOLD", "amount_micros"),
        ({"amount_micros": 17_000_001}, 402, "INSUFFICIENT_EARNINGS", "amount_micros"),
        ({"amount_usd": "17.000001"}, 402, "INSUFFICIENT_EARNINGS", "amount_micros"),
        ({"amount_usd": 6.5}, 400, "INVALID_REQUEST", "amount_usd"),
        ({"amount_usd": "6.5000001"}, 400, "INVALID_REQUEST", "amount_usd"),
        ({"amount_usd": "-6"}, 400, "INVALID_REQUEST", "amount_usd"),
        ({"amount_usd": 0}, 400, "INVALID_REQUEST", "amount_usd"),
        ({"amount_usd": True}, 400, "INVALID_REQUEST", "amount_usd"),
        ({"amount_micros": 6_000_000.0}, 400, "INVALID_REQUEST", "amount_micros"),
        ({"amount_micros": "6000000"}, 400, "INVALID_REQUEST", "amount_micros"),
        ({"amount_micros": 6_000_000, "amount_usd": "6"}, 400, "INVALID_REQUEST", None),
        ({}, 400, "INVALID_REQUEST", None),
        ({"amount_micros": 6_000_000, "to": "x"}, 400, "INVALID_REQUEST", "to"),
    ],
)
async def test_bad_payout_requests(
    live: LiveGateway, body: dict[str, Any], status: int, code: str, param: str | None
) -> None:
    _, key = await _provider(live, 17_000_000)
    async with live.client(key) as client:
        reply = await client.post("/v1/provider/payouts", json=body)
        listed = await client.get("/v1/provider/payouts")
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert (error["code"], error["param"]) == (code, param)
    assert listed.json()["data"] == []


async def test_payout_endpoints_guard_who_may_do_what(live: LiveGateway) -> None:
    provider, key = await _provider(live, 17_000_000)
    _, test_key = await _provider(live, 17_000_000, mode="test")
    stranger, stranger_key = await _provider(live, 17_000_000)
    async with live.client(key) as client:
        payout = (
            await client.post("/v1/provider/payouts", json={"amount_micros": 5_000_000})
        ).json()
    async with live.client(test_key) as sandbox:
        refused = await sandbox.post("/v1/provider/payouts", json={"amount_micros": 5_000_000})
        assert (refused.status_code, refused.json()["error"]["code"]) == (403, "FORBIDDEN")
    async with live.client(stranger_key) as other:
        assert (await other.get(f"/v1/provider/payouts/{payout['id']}")).status_code == 404
        assert (await other.post(f"/v1/provider/payouts/{payout['id']}/cancel")).status_code == 404
        assert (await other.get("/v1/provider/payouts")).json()["data"] == []
        # A provider key is not an admin token.
        assert (await other.get("/admin/payouts")).status_code == 401
        assert (await other.post(f"/admin/payouts/{payout['id']}/approve")).status_code == 401
    async with live.client(ADMIN_TOKEN) as admin:
        assert (await admin.post("/admin/payouts/po_missing/approve")).status_code == 404
        bad_status = await admin.get("/admin/payouts", params={"status": "lost"})
        assert (bad_status.status_code, bad_status.json()["error"]["param"]) == (400, "status")
        mine = await admin.get("/admin/payouts", params={"account_id": provider})
        assert [p["id"] for p in mine.json()["data"]] == [payout["id"]]
        assert (await admin.get("/admin/payouts", params={"account_id": stranger})).json()[
            "data"
        ] == []


async def test_earnings_show_a_locked_bonus(live: LiveGateway) -> None:
    engine = live.gateway.engine
    account = await service.create_account(engine, name="p", developer=False, provider=True)
    key = await service.create_api_key(engine, account_id=account["id"])
    await service.create_device(engine, account_id=account["id"], welcome_bonus_micros=6_000_000)
    async with live.client(key.secret) as client:
        body = (await client.get("/v1/provider/earnings")).json()
        refused = await client.post("/v1/provider/payouts", json={"amount_usd": "6"})
    assert body["balance_micros"] == 6_000_000
    assert body["withdrawable_micros"] == 0
    assert body["welcome_bonus"]["amount_usd"] == "6.000000"
    assert body["welcome_bonus"]["locked_micros"] == 6_000_000
    lock = timedelta(days=live.settings.welcome_bonus_lock_days)
    unlocks = datetime.fromisoformat(body["welcome_bonus"]["unlocks_at"])
    assert lock - timedelta(minutes=1) < unlocks - datetime.now(UTC) <= lock
    assert (refused.status_code, refused.json()["error"]["code"]) == (402, "INSUFFICIENT_EARNINGS")
