"""Idempotency-Key: replays charge once, mismatches are 422, concurrent duplicates 409."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from sqlalchemy import func, select, update

from swarmgate.accounts import service
from swarmgate.accounts.keys import utcnow
from swarmgate.store.tables import charges, idempotency_keys, jobs
from tests.conftest import MODEL, LiveGateway

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "once only"}], "max_tokens": 16}


async def charge_count(live: LiveGateway) -> int:
    await live.gateway.billing.writer.posted()
    async with live.gateway.engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(charges)) or 0)


async def test_a_replay_returns_the_stored_answer_and_charges_once(live: LiveGateway) -> None:
    await live.add_sim_device(length=6)
    _, key = await live.developer_key()
    headers = {"Idempotency-Key": "order-42"}
    async with live.client(key) as client:
        first = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
        second = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert first.status_code == second.status_code == 200
    assert second.json() == first.json()
    assert second.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert await charge_count(live) == 1


async def test_the_same_key_with_another_body_is_422(live: LiveGateway) -> None:
    await live.add_sim_device(length=4)
    _, key = await live.developer_key()
    headers = {"Idempotency-Key": "k1"}
    async with live.client(key) as client:
        assert (await client.post("/v1/chat/completions", json=CHAT, headers=headers)).is_success
        other = await client.post(
            "/v1/chat/completions", json={**CHAT, "max_tokens": 17}, headers=headers
        )
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "IDEMPOTENCY_KEY_REUSED"
    assert await charge_count(live) == 1


async def test_a_concurrent_duplicate_is_409(live: LiveGateway) -> None:
    await live.add_sim_device(length=4, ttft_ms=600)
    _, key = await live.developer_key()
    headers = {"Idempotency-Key": "slow-one"}
    async with live.client(key) as client:
        first = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT, headers=headers))
        await asyncio.sleep(0.2)
        duplicate = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
        assert duplicate.status_code == 409
        assert duplicate.json()["error"]["code"] == "IDEMPOTENCY_IN_PROGRESS"
        assert duplicate.headers["Retry-After"] == "1"
        assert (await first).status_code == 200
        replay = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert replay.json() == (await first).json()
    assert await charge_count(live) == 1


async def test_keys_are_scoped_per_account(live: LiveGateway) -> None:
    await live.add_sim_device(length=4)
    _, key_a = await live.developer_key("a")
    _, key_b = await live.developer_key("b")
    headers = {"Idempotency-Key": "shared-name"}
    async with live.client(key_a) as a, live.client(key_b) as b:
        first = await a.post("/v1/chat/completions", json=CHAT, headers=headers)
        second = await b.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert first.json()["id"] != second.json()["id"]
    assert "Idempotent-Replayed" not in second.headers
    assert await charge_count(live) == 2


async def test_a_402_is_not_stored_so_a_retry_after_a_top_up_runs(live: LiveGateway) -> None:
    await live.add_sim_device(length=4)
    account = await service.create_account(live.gateway.engine, name="poor", credit_micros=0)
    key = (await service.create_api_key(live.gateway.engine, account_id=account["id"])).secret
    headers = {"Idempotency-Key": "after-top-up"}
    async with live.client(key) as client:
        refused = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
        assert refused.status_code == 402
        await live.gateway.billing.top_up(account["id"], 1_000_000, source="admin")
        retried = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert retried.status_code == 200
    assert "Idempotent-Replayed" not in retried.headers


async def test_an_async_job_submitted_twice_is_queued_once(live: LiveGateway) -> None:
    await live.add_sim_device(length=4)
    _, key = await live.developer_key()
    body = {"model": MODEL, "prompt": "queue me once"}
    headers = {"Idempotency-Key": "job-1"}
    async with live.client(key) as client:
        first = await client.post("/v1/jobs", json=body, headers=headers)
        second = await client.post("/v1/jobs", json=body, headers=headers)
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    async with live.gateway.engine.connect() as conn:
        assert await conn.scalar(select(func.count()).select_from(jobs)) == 1


async def test_bad_keys_and_expired_keys(live: LiveGateway) -> None:
    await live.add_sim_device(length=4)
    account_id, key = await live.developer_key()
    async with live.client(key) as client:
        too_long = await client.post(
            "/v1/chat/completions", json=CHAT, headers={"Idempotency-Key": "x" * 256}
        )
        assert too_long.status_code == 400
        assert too_long.json()["error"]["param"] == "Idempotency-Key"
        assert (
            await client.post("/v1/chat/completions", json=CHAT, headers={"Idempotency-Key": "old"})
        ).is_success
        # A key past its 24 hours is forgotten: the same key runs a new request.
        async with live.gateway.engine.begin() as conn:
            await conn.execute(
                update(idempotency_keys).values(expires_at=utcnow() - timedelta(seconds=1))
            )
        again = await client.post(
            "/v1/chat/completions", json=CHAT, headers={"Idempotency-Key": "old"}
        )
    assert again.status_code == 200 and "Idempotent-Replayed" not in again.headers
    assert await live.gateway.idempotency.purge_expired(utcnow() + timedelta(days=2)) == 1
    assert await charge_count(live) == 2
    assert account_id


async def test_no_key_means_no_idempotency_bookkeeping(live: LiveGateway) -> None:
    await live.add_sim_device(length=4)
    _, key = await live.developer_key()
    async with live.client(key) as client:
        for _ in range(2):
            assert (await client.post("/v1/chat/completions", json=CHAT)).is_success
    async with live.gateway.engine.connect() as conn:
        assert await conn.scalar(select(func.count()).select_from(idempotency_keys)) == 0
    assert await charge_count(live) == 2
