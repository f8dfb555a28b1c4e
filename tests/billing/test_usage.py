"""GET /v1/usage: totals, by model and by key, agree with the ledger to the micro-dollar."""

from __future__ import annotations

from decimal import Decimal

from swarmgate.accounts import service
from swarmgate.billing.ledger import developer_book
from tests.billing.test_request_billing import chat, developer, priced  # noqa: F401
from tests.conftest import LiveGateway


async def test_usage_totals_match_the_charges_and_the_balance(priced: LiveGateway) -> None:  # noqa: F811
    await priced.add_sim_device(length=7)
    account, key_id, key = await developer(priced, 2_000_000, daily_spend_cap_micros=10**9)
    async with priced.client(key) as client:
        answers = [
            (await client.post("/v1/chat/completions", json=chat(f"q{i}", max_tokens=30))).json()
            for i in range(3)
        ]
        usage = await client.get("/v1/usage")
    assert usage.status_code == 200, usage.text
    body = usage.json()
    tokens = sum(a["usage"]["total_tokens"] for a in answers)
    cost = sum(a["usage"]["prompt_tokens"] + 2 * a["usage"]["completion_tokens"] for a in answers)
    assert body["object"] == "usage" and body["mode"] == "live"
    assert (body["total_requests"], body["total_tokens"], body["total_cost_micros"]) == (
        3,
        tokens,
        cost,
    )
    assert body["by_model"]["smollm2-135m-instruct-q4_1"]["requests"] == 3
    balance = (await priced.gateway.billing.ledger.book_balances([developer_book(account)]))[
        developer_book(account)
    ]
    assert body["balance_micros"] == balance == 2_000_000 - cost
    # Dollars are written from integers: exact to the micro-dollar.
    assert Decimal(usage.text.split('"balance_usd":')[1].split(",")[0]) == Decimal(balance) / 10**6
    [per_key] = body["by_key"]
    assert per_key["key_id"] == key_id and per_key["cost_micros"] == cost
    assert per_key["spent_today_micros"] == cost
    assert body["period_start"].endswith("-01T00:00:00Z")


async def test_a_test_key_sees_the_sandbox(priced: LiveGateway) -> None:  # noqa: F811
    await priced.add_sim_device(length=3)
    account, _, _ = await developer(priced, 2_000_000)
    test_key = await service.create_api_key(priced.gateway.engine, account_id=account, mode="test")
    await priced.gateway.billing.top_up(account, 300_000, source="admin", sandbox=True)
    async with priced.client(test_key.secret) as client:
        assert (await client.post("/v1/chat/completions", json=chat(max_tokens=10))).is_success
        body = (await client.get("/v1/usage")).json()
    assert body["mode"] == "test" and body["total_requests"] == 1
    assert body["balance_micros"] == 300_000 - body["total_cost_micros"]


async def test_bad_periods_are_400(priced: LiveGateway) -> None:  # noqa: F811
    _, _, key = await developer(priced, 1)
    async with priced.client(key) as client:
        only_start = await client.get("/v1/usage", params={"start": "2026-01-01"})
        backwards = await client.get(
            "/v1/usage", params={"start": "2026-02-01", "end": "2026-01-01"}
        )
        not_a_date = await client.get("/v1/usage", params={"start": "soon", "end": "later"})
        ok = await client.get("/v1/usage", params={"start": "2026-01-01", "end": "2026-01-31"})
    assert [r.status_code for r in (only_start, backwards, not_a_date)] == [400, 400, 400]
    assert ok.json()["period_end"] == "2026-01-31T23:59:59Z"
