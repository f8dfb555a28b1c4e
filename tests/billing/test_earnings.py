"""Providers' and devices' earnings: money as text, the reports, and their endpoints."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from swarmgate.accounts import service
from swarmgate.accounts.keys import new_id
from swarmgate.billing.earnings import (
    Totals,
    device_report,
    format_usd,
    parse_usd,
    provider_report,
    window_start,
)
from swarmgate.billing.ledger import Ledger, Settlement
from swarmgate.errors import RequestError
from swarmgate.store.tables import charges
from tests.billing.test_ledger_race import postgres_engine, sqlite_engine
from tests.conftest import ADMIN_TOKEN, LiveGateway

NOW = datetime(2026, 11, 23, 15, 30, tzinfo=UTC)


async def record_job(
    engine: AsyncEngine,
    *,
    developer: str,
    provider: str,
    device_id: str | None,
    cost: int,
    when: datetime,
    model: str = "model-a",
    sandbox: bool = False,
    tokens: tuple[int, int] = (10, 20),
) -> Settlement:
    """A settled job as the request path leaves it: ledger entries plus its charges row."""
    ledger = Ledger(engine)
    job_id = new_id("job")
    await ledger.top_up(developer, cost, "test", sandbox=sandbox)
    hold_id = await ledger.hold(developer, cost, job_id, ttl_s=60, sandbox=sandbox)
    settlement = await ledger.settle(hold_id, cost, provider)
    async with engine.begin() as conn:
        await conn.execute(
            insert(charges).values(
                job_id=job_id,
                account_id=developer,
                sandbox=sandbox,
                model=model,
                device_id=device_id,
                provider_account_id=provider,
                prompt_tokens=tokens[0],
                completion_tokens=tokens[1],
                cost_micros=settlement.charged_micros,
                provider_micros=settlement.provider_micros,
                platform_micros=settlement.platform_micros,
                transaction_id=settlement.transaction_id,
                created_at=when,
            )
        )
    return settlement


# -- money as text ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("micros", "text"),
    [
        (0, "0.000000"),
        (1, "0.000001"),
        (850, "0.000850"),
        (1_000_000, "1.000000"),
        (12_345_678, "12.345678"),
        (-1, "-0.000001"),
        (-12_500_000, "-12.500000"),
        (10**15, "1000000000.000000"),
    ],
)
def test_format_usd(micros: int, text: str) -> None:
    assert format_usd(micros) == text


@pytest.mark.parametrize("value", [1.5, True, "1"])
def test_format_usd_refuses_what_is_not_an_int(value: Any) -> None:
    with pytest.raises(TypeError):
        format_usd(value)


@pytest.mark.parametrize(
    ("text", "micros"),
    [
        ("12.5", 12_500_000),
        ("12.50", 12_500_000),
        ("0.000001", 1),
        ("5", 5_000_000),
        (" 7.25 ", 7_250_000),
        ("999999999.999999", 999_999_999_999_999),
        # 0.1 + 0.2 style amounts stay exact: no float ever holds them.
        ("0.3", 300_000),
    ],
)
def test_parse_usd(text: str, micros: int) -> None:
    assert parse_usd(text) == micros


@pytest.mark.parametrize(
    "text", ["", "0", "0.000000", "1.0000001", "-1", "1e3", "$5", "1,000", ".5", "5.", "nan"]
)
def test_parse_usd_refuses(text: str) -> None:
    with pytest.raises(RequestError) as caught:
        parse_usd(text)
    assert caught.value.param == "amount_usd"


@pytest.mark.parametrize(
    ("now", "days", "start"),
    [
        (NOW, 1, datetime(2026, 11, 23, tzinfo=UTC)),
        (NOW, 30, datetime(2026, 10, 25, tzinfo=UTC)),
        # 01:00 at +03:00 is still the previous UTC day.
        (
            datetime(2026, 11, 23, 1, 0, tzinfo=timezone(timedelta(hours=3))),
            1,
            datetime(2026, 11, 22, tzinfo=UTC),
        ),
    ],
)
def test_window_start(now: datetime, days: int, start: datetime) -> None:
    assert window_start(now, days) == start


@pytest.mark.parametrize("days", [0, -1, 367])
def test_window_start_refuses_bad_days(days: int) -> None:
    with pytest.raises(RequestError):
        window_start(NOW, days)


# -- the reports, on SQLite and PostgreSQL --------------------------------------------
@pytest.fixture(params=["sqlite", "postgresql"])
async def engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    opened = (
        sqlite_engine(tmp_path / "earnings.db") if request.param == "sqlite" else postgres_engine()
    )
    async with opened as engine:
        yield engine


async def _book_of_jobs(engine: AsyncEngine) -> dict[str, str]:
    """Two providers, three devices, jobs spread over 40 days; returns the ids."""
    developer = await service.create_account(engine, name="dev")
    provider = await service.create_account(engine, name="prov", developer=False, provider=True)
    other = await service.create_account(engine, name="other", developer=False, provider=True)
    phone = await service.create_device(engine, account_id=provider["id"], name="phone")
    laptop = await service.create_device(engine, account_id=provider["id"], name="laptop")
    elsewhere = await service.create_device(engine, account_id=other["id"], name="theirs")
    ids = {
        "developer": developer["id"],
        "provider": provider["id"],
        "other": other["id"],
        "phone": phone.id,
        "laptop": laptop.id,
        "elsewhere": elsewhere.id,
    }
    jobs: list[tuple[str, str, int, timedelta, str, bool]] = [
        # provider, device, cost, age, model, sandbox  -> provider earns cost * 85 %
        ("provider", "phone", 1_000, timedelta(0), "model-a", False),  # 850
        ("provider", "phone", 2_000, timedelta(hours=1), "model-b", False),  # 1_700
        ("provider", "laptop", 3_000, timedelta(days=1), "model-a", False),  # 2_550
        ("provider", "phone", 400, timedelta(days=5), "model-b", False),  # 340
        ("provider", "phone", 10_000, timedelta(days=40), "model-a", False),  # 8_500, old
        ("provider", "phone", 9_000, timedelta(0), "model-a", True),  # sandbox: nobody earns
        ("other", "elsewhere", 7_000, timedelta(0), "model-a", False),  # someone else's
    ]
    for owner, device, cost, age, model, sandbox in jobs:
        await record_job(
            engine,
            developer=ids["developer"],
            provider=ids[owner],
            device_id=ids[device],
            cost=cost,
            when=NOW - age,
            model=model,
            sandbox=sandbox,
        )
    return ids


async def test_provider_report_breaks_earnings_down(engine: AsyncEngine) -> None:
    ids = await _book_of_jobs(engine)
    report = await provider_report(engine, ids["provider"], days=30, now=NOW, lock_days=30)

    assert report.since == datetime(2026, 10, 25, tzinfo=UTC)
    assert report.window == Totals(jobs=4, tokens=120, earned_micros=5_440)
    assert report.all_time == Totals(jobs=5, tokens=150, earned_micros=13_940)
    assert report.funds.balance_micros == 13_940
    assert report.funds.withdrawable_micros == 13_940
    assert len(report.by_day) == 30
    assert report.by_day[0][0] == date(2026, 10, 25)
    days = dict(report.by_day)
    assert days[date(2026, 11, 23)] == Totals(2, 60, 2_550)
    assert days[date(2026, 11, 22)] == Totals(1, 30, 2_550)
    assert days[date(2026, 11, 18)] == Totals(1, 30, 340)
    assert sum(days.values(), Totals()) == report.window
    assert report.by_model == [
        ("model-a", Totals(2, 60, 3_400)),
        ("model-b", Totals(2, 60, 2_040)),
    ]
    assert [(d.device_id, d.name, d.totals) for d in report.by_device] == [
        (ids["phone"], "phone", Totals(3, 90, 2_890)),
        (ids["laptop"], "laptop", Totals(1, 30, 2_550)),
    ]

    today = await provider_report(engine, ids["provider"], days=1, now=NOW, lock_days=30)
    assert today.window == Totals(2, 60, 2_550)
    assert [when for when, _ in today.by_day] == [date(2026, 11, 23)]


async def test_provider_report_of_a_provider_with_nothing(engine: AsyncEngine) -> None:
    ids = await _book_of_jobs(engine)
    report = await provider_report(engine, ids["developer"], days=7, now=NOW, lock_days=30)
    assert report.window == report.all_time == Totals()
    assert report.by_model == [] and report.by_device == []
    assert [t for _, t in report.by_day] == [Totals()] * 7


async def test_device_report(engine: AsyncEngine) -> None:
    ids = await _book_of_jobs(engine)
    phone = await device_report(
        engine, device_id=ids["phone"], name="phone", account_id=ids["provider"], now=NOW,
        lock_days=30,
    )  # fmt: skip
    assert phone.today == Totals(2, 60, 2_550)
    assert phone.last_30_days == Totals(3, 90, 2_890)
    assert phone.all_time == Totals(4, 120, 11_390)
    assert phone.funds.withdrawable_micros == 13_940  # the whole account's


# -- the endpoints ------------------------------------------------------------------------
async def _provider_with_key(live: LiveGateway) -> tuple[str, str]:
    account = await service.create_account(
        live.gateway.engine, name="provider", developer=False, provider=True
    )
    key = await service.create_api_key(live.gateway.engine, account_id=account["id"])
    return account["id"], key.secret


async def test_provider_earnings_endpoint(live: LiveGateway) -> None:
    engine = live.gateway.engine
    provider, key = await _provider_with_key(live)
    developer, _ = await live.developer_key()
    phone = await service.create_device(engine, account_id=provider, name="phone")
    now = datetime.now(UTC)
    await record_job(engine, developer=developer, provider=provider, device_id=phone.id,
                     cost=1_000, when=now)  # fmt: skip
    await record_job(engine, developer=developer, provider=provider, device_id=phone.id,
                     cost=20_000, when=now - timedelta(days=60), model="model-b")  # fmt: skip

    async with live.client(key) as client:
        reply = await client.get("/v1/provider/earnings")
        week = await client.get("/v1/provider/earnings", params={"days": 7})
        bad = [await client.get("/v1/provider/earnings", params={"days": d}) for d in (0, 367)]
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "provider.earnings"
    assert body["account_id"] == provider
    assert body["days"] == 30
    assert (body["balance_micros"], body["balance_usd"]) == (17_850, "0.017850")
    assert (body["withdrawable_micros"], body["withdrawable_usd"]) == (17_850, "0.017850")
    assert (body["pending_payouts_micros"], body["paid_out_micros"]) == (0, 0)
    assert body["welcome_bonus"] is None
    assert body["payout_threshold_micros"] == 5_000_000
    assert body["payout_threshold_usd"] == "5.000000"
    assert body["totals"] == {
        "jobs": 1,
        "tokens": 30,
        "earned_micros": 850,
        "earned_usd": "0.000850",
    }
    assert body["all_time"]["earned_micros"] == 17_850
    assert len(body["by_day"]) == 30
    assert body["by_day"][-1] == {
        "date": now.date().isoformat(), "jobs": 1, "tokens": 30, "earned_micros": 850,
        "earned_usd": "0.000850",
    }  # fmt: skip
    assert body["by_model"] == [
        {
            "model": "model-a",
            "jobs": 1,
            "tokens": 30,
            "earned_micros": 850,
            "earned_usd": "0.000850",
        }
    ]
    assert body["by_device"] == [
        {"device_id": phone.id, "name": "phone", "jobs": 1, "tokens": 30, "earned_micros": 850,
         "earned_usd": "0.000850"}
    ]  # fmt: skip
    assert len(week.json()["by_day"]) == 7
    for refused in bad:
        assert refused.status_code == 400
        assert refused.json()["error"]["param"] == "days"

    async with live.client() as anonymous:
        assert (await anonymous.get("/v1/provider/earnings")).status_code == 401


async def test_node_earnings_endpoint_takes_a_device_token(live: LiveGateway) -> None:
    engine = live.gateway.engine
    provider, key = await _provider_with_key(live)
    developer, _ = await live.developer_key()
    phone = await service.create_device(engine, account_id=provider, name="phone")
    laptop = await service.create_device(engine, account_id=provider, name="laptop")
    now = datetime.now(UTC)
    for device, cost, age in (
        (phone, 1_000, timedelta(0)),
        (phone, 2_000, timedelta(days=10)),
        (phone, 3_000, timedelta(days=90)),
        (laptop, 4_000, timedelta(0)),
    ):
        await record_job(engine, developer=developer, provider=provider, device_id=device.id,
                         cost=cost, when=now - age)  # fmt: skip

    async with live.client(phone.secret) as node:
        reply = await node.get("/v1/nodes/earnings")
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "node.earnings"
    assert (body["device_id"], body["name"], body["account_id"]) == (phone.id, "phone", provider)
    assert body["jobs_served"] == 3
    assert body["today"] == {
        "jobs": 1,
        "tokens": 30,
        "earned_micros": 850,
        "earned_usd": "0.000850",
    }
    assert body["last_30_days"]["earned_micros"] == 850 + 1_700
    assert body["all_time"]["earned_micros"] == 850 + 1_700 + 2_550
    # The account's money is shared by its devices.
    assert body["account"]["withdrawable_micros"] == 850 + 1_700 + 2_550 + 3_400
    assert body["account"]["withdrawable_usd"] == "0.008500"

    for wrong in (key, "sg_dev_not-a-real-token", None, ADMIN_TOKEN):
        async with live.client(wrong) as client:
            refused = await client.get("/v1/nodes/earnings")
        assert refused.status_code == 401, wrong
        assert refused.json()["error"]["code"] == "INVALID_DEVICE_TOKEN"
