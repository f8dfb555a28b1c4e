"""Billing on the request path, over real sockets: holds, settlement, voids, 402, limits."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import func, select

from swarmgate.accounts import service
from swarmgate.accounts.keys import Principal
from swarmgate.api.running import admit, new_job_id, release
from swarmgate.billing.ledger import PLATFORM_REVENUE, developer_book, holds_book, provider_book
from swarmgate.billing.pricing import job_cost_micros, split_earnings
from swarmgate.billing.service import prompt_token_bound
from swarmgate.catalog import Catalog
from swarmgate.protocol import ChatMessage, SamplingParams
from swarmgate.routing.choice import Route
from swarmgate.routing.dispatch import JobSpec
from swarmgate.store.tables import api_keys, balances, charges, ledger_entries
from tests.conftest import LiveGateway, fast_settings, start_gateway, stop_gateway

MODEL = "smollm2-135m-instruct-q4_1"
# Prices large enough that every token moves money: 1 micro-dollar per input token,
# 2 per output token.
PRICING = {"input_per_1m_micros": 1_000_000, "output_per_1m_micros": 2_000_000}


def priced_catalog(path: Path) -> Path:
    catalog = orjson.loads((Path(__file__).parents[2] / "src/swarmgate/catalog.json").read_bytes())
    for model in catalog["models"]:
        model["pricing"] = PRICING
    target = path / "catalog.json"
    target.write_bytes(orjson.dumps(catalog))
    return target


@pytest.fixture
async def priced(tmp_path: Path) -> AsyncIterator[LiveGateway]:
    live = await start_gateway(fast_settings(tmp_path, catalog_path=priced_catalog(tmp_path)))
    try:
        yield live
    finally:
        await stop_gateway(live)


async def developer(live: LiveGateway, credit: int, **key_settings: Any) -> tuple[str, str, str]:
    account = await service.create_account(live.gateway.engine, name="dev", credit_micros=credit)
    key = await service.create_api_key(live.gateway.engine, account_id=account["id"])
    if key_settings:
        async with live.gateway.engine.begin() as conn:
            await conn.execute(
                api_keys.update().where(api_keys.c.id == key.id).values(**key_settings)
            )
    return account["id"], key.id, key.secret


async def posted(live: LiveGateway) -> None:
    """Charges are durable when an answer is sent and in the ledger a few ms later."""
    await live.gateway.billing.writer.posted()


async def books(live: LiveGateway, *names: str) -> dict[str, int]:
    await posted(live)
    return await live.gateway.billing.ledger.book_balances(names)


async def ledger_total(live: LiveGateway) -> int:
    await posted(live)
    async with live.gateway.engine.connect() as conn:
        entries = await conn.scalar(
            select(func.coalesce(func.sum(ledger_entries.c.amount_micros), 0))
        )
        books_sum = await conn.scalar(select(func.coalesce(func.sum(balances.c.amount_micros), 0)))
    assert entries == 0 and books_sum == 0
    return 0


def chat(content: str = "bill me", **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


async def provider_of(live: LiveGateway) -> str:
    device = next(iter(live.gateway.registry.devices()))
    return device.account_id


async def test_a_completed_request_is_charged_and_the_provider_earns_85_percent(
    priced: LiveGateway,
) -> None:
    await priced.add_sim_device(length=10)
    account, _, key = await developer(priced, 1_000_000)
    async with priced.client(key) as client:
        response = await client.post("/v1/chat/completions", json=chat(max_tokens=50))
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    cost = job_cost_micros(
        Catalog.load(priced.settings.catalog_path).get(MODEL).pricing,  # type: ignore[union-attr]
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    assert cost == usage["prompt_tokens"] + 2 * usage["completion_tokens"]
    provider = await provider_of(priced)
    earned, platform = split_earnings(cost)
    found = await books(
        priced,
        developer_book(account),
        holds_book(account),
        provider_book(provider),
        PLATFORM_REVENUE,
    )
    assert found == {
        developer_book(account): 1_000_000 - cost,
        holds_book(account): 0,
        provider_book(provider): earned,
        PLATFORM_REVENUE: platform,
    }
    await posted(priced)
    async with priced.gateway.engine.connect() as conn:
        row = (await conn.execute(select(charges))).one()
    assert (row.job_id, row.cost_micros, row.provider_account_id) == (
        response.json()["id"],
        cost,
        provider,
    )
    assert row.prompt_tokens == usage["prompt_tokens"]
    await ledger_total(priced)
    assert priced.gateway.billing.open_holds() == 0


async def test_not_enough_credit_is_402_and_nothing_runs(priced: LiveGateway) -> None:
    await priced.add_sim_device(length=10)
    account, _, key = await developer(priced, 100)  # less than any hold at max_tokens=256
    async with priced.client(key) as client:
        response = await client.post("/v1/chat/completions", json=chat())
    assert response.status_code == 402, response.text
    error = response.json()["error"]
    assert error["code"] == "INSUFFICIENT_CREDITS"
    assert error["type"] == "insufficient_quota"
    device = next(iter(priced.gateway.registry.devices()))
    assert device.jobs_served == 0 and not device.active
    assert (await books(priced, developer_book(account)))[developer_book(account)] == 100
    await posted(priced)
    async with priced.gateway.engine.connect() as conn:
        assert await conn.scalar(select(func.count()).select_from(charges)) == 0


async def test_failed_and_timed_out_jobs_are_not_charged(priced: LiveGateway) -> None:
    await priced.add_sim_device(error_after_tokens=2, length=10)
    account, _, key = await developer(priced, 1_000_000)
    async with priced.client(key) as client:
        failed = await client.post("/v1/chat/completions", json=chat())
        streamed = await client.post("/v1/chat/completions", json=chat(stream=True))
    assert failed.status_code == 502
    assert "STREAM_INTERRUPTED" in streamed.text
    await priced.stop_agents()
    await priced.add_sim_device(hang=True)
    async with priced.client(key) as client:
        timed_out = await client.post("/v1/chat/completions", json=chat())
    assert timed_out.status_code == 408
    assert (await books(priced, developer_book(account)))[developer_book(account)] == 1_000_000
    assert (await priced.gateway.billing.balance(account)).available_micros == 1_000_000
    assert priced.gateway.billing.open_holds() == 0


async def test_a_stream_is_charged_before_its_usage_and_done_frames(priced: LiveGateway) -> None:
    await priced.add_sim_device(length=6)
    account, _, key = await developer(priced, 1_000_000)
    async with priced.client(key) as client:
        response = await client.post(
            "/v1/chat/completions",
            json=chat(stream=True, stream_options={"include_usage": True}),
        )
    assert response.status_code == 200
    lines = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    usage = orjson.loads(lines[-2])["usage"]
    cost = usage["prompt_tokens"] + 2 * usage["completion_tokens"]
    assert (await books(priced, developer_book(account)))[
        developer_book(account)
    ] == 1_000_000 - cost


async def test_a_client_that_leaves_mid_stream_is_not_charged(priced: LiveGateway) -> None:
    await priced.add_sim_device(length=200, tokens_per_s=50)
    account, _, key = await developer(priced, 1_000_000)
    async with (
        priced.client(key) as client,
        client.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as resp,
    ):
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                break  # one chunk, then hang up
    for _ in range(100):
        if priced.gateway.billing.open_holds() == 0:
            break
        await asyncio.sleep(0.02)
    assert priced.gateway.billing.open_holds() == 0
    assert (await priced.gateway.billing.balance(account)).available_micros == 1_000_000


async def test_sandbox_keys_spend_play_credit_only(priced: LiveGateway) -> None:
    await priced.add_sim_device(length=10)
    account, _, live_key = await developer(priced, 1_000_000)
    test_key = await service.create_api_key(priced.gateway.engine, account_id=account, mode="test")
    await priced.gateway.billing.top_up(account, 500_000, source="admin", sandbox=True)
    async with priced.client(test_key.secret) as client:
        response = await client.post("/v1/chat/completions", json=chat(max_tokens=20))
    assert response.status_code == 200, response.text
    provider = await provider_of(priced)
    sandbox = developer_book(account, sandbox=True)
    found = await books(priced, developer_book(account), sandbox, provider_book(provider))
    assert found[developer_book(account)] == 1_000_000  # live money untouched
    assert found[sandbox] < 500_000
    assert found[provider_book(provider)] == 0  # nobody earns play money
    # And a live key never spends sandbox credit.
    async with priced.client(live_key) as client:
        assert (
            await client.post("/v1/chat/completions", json=chat(max_tokens=20))
        ).status_code == 200
    assert (await books(priced, sandbox))[sandbox] == found[sandbox]
    await ledger_total(priced)


async def test_a_test_key_without_play_credit_gets_402(priced: LiveGateway) -> None:
    await priced.add_sim_device(length=10)
    account, _, _ = await developer(priced, 1_000_000)
    test_key = await service.create_api_key(priced.gateway.engine, account_id=account, mode="test")
    async with priced.client(test_key.secret) as client:
        response = await client.post("/v1/chat/completions", json=chat())
    assert response.status_code == 402
    assert "sandbox credit" in response.json()["error"]["message"]


async def test_daily_spend_cap_is_402_with_its_own_code(priced: LiveGateway) -> None:
    await priced.add_sim_device(length=10)
    _, _, key = await developer(priced, 1_000_000, daily_spend_cap_micros=1_000)
    codes = []
    async with priced.client(key) as client:
        for _ in range(80):
            response = await client.post("/v1/chat/completions", json=chat(max_tokens=20))
            codes.append(response.status_code)
            if response.status_code != 200:
                assert response.json()["error"]["code"] == "DAILY_SPEND_CAP_EXCEEDED"
                break
    assert codes[0] == 200 and codes[-1] == 402
    await posted(priced)
    async with priced.gateway.engine.connect() as conn:
        spent = await conn.scalar(select(func.sum(charges.c.cost_micros)))
    assert spent is not None and spent <= 1_000


async def test_requests_per_minute_limit_is_429_with_retry_after(priced: LiveGateway) -> None:
    await priced.add_sim_device(length=4)
    _, _, key = await developer(priced, 1_000_000, rpm_limit=2)
    async with priced.client(key) as client:
        statuses = [
            (await client.post("/v1/chat/completions", json=chat(max_tokens=8))) for _ in range(3)
        ]
    assert [r.status_code for r in statuses] == [200, 200, 429]
    limited = statuses[-1]
    assert limited.json()["error"]["code"] == "RATE_LIMIT_EXCEEDED"
    assert limited.json()["error"]["type"] == "rate_limit_error"
    assert int(limited.headers["Retry-After"]) == limited.json()["error"]["retry_after"] >= 1


async def test_tokens_per_minute_limit_counts_what_requests_may_use(priced: LiveGateway) -> None:
    await priced.add_sim_device(length=4)
    _, _, key = await developer(priced, 1_000_000, tpm_limit=300)
    async with priced.client(key) as client:
        first = await client.post("/v1/chat/completions", json=chat(max_tokens=200))
        # The first request used few of its 200 tokens and gave the rest back.
        second = await client.post("/v1/chat/completions", json=chat(max_tokens=200))
        third = await client.post("/v1/chat/completions", json=chat(max_tokens=280))
    assert first.status_code == 200 and second.status_code == 200
    assert third.status_code == 429


async def test_a_model_off_the_keys_allow_list_is_403(priced: LiveGateway) -> None:
    await priced.add_sim_device(length=4)
    _, _, key = await developer(
        priced, 1_000_000, allowed_models=orjson.dumps(["qwen2.5-0.5b-instruct-q6_k"]).decode()
    )
    async with priced.client(key) as client:
        response = await client.post("/v1/chat/completions", json=chat())
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "MODEL_NOT_ALLOWED"


async def test_100_requests_racing_for_the_last_credits_never_overdraw(
    priced: LiveGateway,
) -> None:
    for _ in range(4):
        await priced.add_sim_device(length=5, slots=8, tokens_per_s=200)
    credit = 3_000  # enough for a handful of holds at max_tokens=100
    account, _, key = await developer(priced, credit)
    async with priced.client(key, limits=httpx.Limits(max_connections=100)) as client:
        responses = await asyncio.gather(
            *(
                client.post("/v1/chat/completions", json=chat(f"race {i}", max_tokens=100))
                for i in range(100)
            )
        )
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 402, 503}, statuses
    assert statuses.count(402) > 0 and statuses.count(200) > 0
    await posted(priced)
    async with priced.gateway.engine.connect() as conn:
        spent = int(await conn.scalar(select(func.coalesce(func.sum(charges.c.cost_micros), 0))))
        charged_jobs = set((await conn.scalars(select(charges.c.job_id))).all())
    ok_jobs = {r.json()["id"] for r in responses if r.status_code == 200}
    assert charged_jobs == ok_jobs  # every answer paid for, nothing else charged
    balance = (await books(priced, developer_book(account)))[developer_book(account)]
    assert balance == credit - spent >= 0
    await ledger_total(priced)


async def test_async_jobs_hold_in_the_ledger_then_settle_with_their_result(
    priced: LiveGateway,
) -> None:
    await priced.add_sim_device(length=10)
    account, _, key = await developer(priced, 1_000_000)
    async with priced.client(key) as client:
        submitted = await client.post(
            "/v1/jobs", json={"model": MODEL, "prompt": "later please", "max_tokens": 40}
        )
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["id"]
        for _ in range(200):
            job = (await client.get(f"/v1/jobs/{job_id}")).json()
            if job["status"] in ("completed", "failed"):
                break
            await asyncio.sleep(0.02)
    assert job["status"] == "completed", job
    usage = job["result"]["usage"]
    cost = usage["prompt_tokens"] + 2 * usage["completion_tokens"]
    found = await books(priced, developer_book(account), holds_book(account))
    assert found == {developer_book(account): 1_000_000 - cost, holds_book(account): 0}
    await ledger_total(priced)


async def test_an_async_job_without_credit_is_refused_at_submission(priced: LiveGateway) -> None:
    _, _, key = await developer(priced, 10)
    async with priced.client(key) as client:
        response = await client.post("/v1/jobs", json={"model": MODEL, "prompt": "x"})
    assert response.status_code == 402


async def test_a_failed_async_job_gives_its_hold_back(priced: LiveGateway) -> None:
    await priced.add_sim_device(error_after_tokens=1)
    account, _, key = await developer(priced, 1_000_000)
    async with priced.client(key) as client:
        job_id = (
            await client.post("/v1/jobs", json={"model": MODEL, "prompt": "fail", "max_tokens": 40})
        ).json()["id"]
        for _ in range(400):
            job = (await client.get(f"/v1/jobs/{job_id}")).json()
            if job["status"] in ("completed", "failed"):
                break
            await asyncio.sleep(0.02)
    assert job["status"] == "failed"
    found = await books(priced, developer_book(account), holds_book(account))
    assert found == {developer_book(account): 1_000_000, holds_book(account): 0}


async def test_admission_caps_the_route_at_what_the_hold_covers(priced: LiveGateway) -> None:
    """The hold covers the dearest device a request may land on now; admission caps the
    request's route at that price per model, so a dearer device joining later is not
    used for it. A request's own route is capped in place, a shared default copied."""
    await priced.add_sim_device(length=10)
    account, key_id, _ = await developer(priced, 1_000_000)
    principal = Principal(account, key_id, "live")
    gateway = priced.gateway
    catalog_price = gateway.device_price(None, MODEL)

    def spec(route: Route | None) -> JobSpec:
        return JobSpec(
            new_job_id("chatcmpl-"),
            account,
            key_id,
            "chat",
            MODEL,
            (ChatMessage(role="user", content="cap me"),),
            SamplingParams(max_tokens=16, temperature=0.0, top_p=1.0),
            False,
            route,
        )

    own = Route(models=(MODEL,), max_tokens=16)
    admitted = await admit(gateway, principal, spec(own))
    assert admitted.spec.route is own and own.price_caps == {MODEL: catalog_price}
    assert admitted.hold is not None
    assert admitted.hold.amount_micros == job_cost_micros(
        catalog_price, prompt_bound(admitted.spec), 16
    )
    release(gateway, admitted)
    bare = spec(None)
    admitted = await admit(gateway, principal, bare)
    assert bare.route is None  # the caller's spec is left as it was
    assert admitted.spec.route is not None
    assert admitted.spec.route.price_caps == {MODEL: catalog_price}
    release(gateway, admitted)
    assert gateway.billing.holds_open == 0


def prompt_bound(spec: JobSpec) -> int:
    return prompt_token_bound(message.content for message in spec.messages)
