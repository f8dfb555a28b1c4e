"""The OpenAI-compatible surface against simulated devices, through the official SDK."""

from __future__ import annotations

import asyncio
import re

import pytest

from swarmgate.node.backends.sim import sim_answer
from tests.conftest import ADMIN_TOKEN, MODEL, LiveGateway


async def test_non_streaming_completion_has_openai_shape_and_usage(live: LiveGateway) -> None:
    await live.add_sim_device(length=12)
    _, key = await live.developer_key()
    client = live.sdk(key)
    reply = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        seed=7,
    )
    assert reply.object == "chat.completion"
    assert reply.id.startswith("chatcmpl-")
    assert reply.model == MODEL
    expected = "".join(sim_answer(MODEL, "be brief\x01hi", 7, 12))
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12
    extra = reply.model_extra or {}
    assert extra["swarmgate"]["inference_type"] == "p2p"
    assert extra["swarmgate"]["attempts"] == 1
    assert extra["swarmgate"]["device_id"].startswith("dev_")


async def test_streaming_sends_role_first_finish_last_and_usage(live: LiveGateway) -> None:
    await live.add_sim_device(length=30)
    _, key = await live.developer_key()
    client = live.sdk(key)
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": [{"type": "text", "text": "count"}]}],
        max_tokens=9,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len(content_chunks) == 9
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == ["length"]
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1]
    assert usage_chunks[0].choices == []
    assert usage_chunks[0].usage.completion_tokens == len(content_chunks)
    text = "".join(c.choices[0].delta.content for c in content_chunks)
    assert text == "".join(sim_answer(MODEL, "count", None, 9))


async def test_stream_without_usage_option_has_no_usage_chunk(live: LiveGateway) -> None:
    await live.add_sim_device(length=3)
    _, key = await live.developer_key()
    async with live.client(key) as client:
        response = await client.post(
            "/v1/chat/completions",
            json={"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "x"}]},
        )
    assert response.headers["content-type"].startswith("text/event-stream")
    frames = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    assert all('"usage"' not in frame for frame in frames[:-1])


async def test_models_lists_catalog_with_live_availability(live: LiveGateway) -> None:
    _, key = await live.developer_key()
    client = live.sdk(key)
    before = {m.id: m.model_extra for m in (await client.models.list()).data}
    assert set(before) >= {
        MODEL,
        "llama-3.2-1b-instruct-q4_k_m",
        "phi-3-mini-4k-instruct-q4_k_m",
        "qwen2.5-0.5b-instruct-q6_k",
        "mistral-7b-instruct-q4_k_m",
    }
    assert before[MODEL]["available"] is False
    assert before[MODEL]["tier"] == "p2p"
    assert before[MODEL]["context_length"] == 8192
    assert before[MODEL]["pricing"]["input_per_1m_micros"] == 10000
    await live.add_sim_device()
    after = {m.id: m.model_extra for m in (await client.models.list()).data}
    assert after[MODEL]["available"] is True
    assert after["mistral-7b-instruct-q4_k_m"]["available"] is False


async def test_inference_endpoint_returns_output_and_provider(live: LiveGateway) -> None:
    await live.add_sim_device(length=40)
    _, key = await live.developer_key()
    async with live.client(key) as client:
        response = await client.post(
            "/v1/inference", json={"model": MODEL, "prompt": "Write a haiku about AI"}
        )
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "inference"
    assert body["id"].startswith("inf_")
    assert body["output"] == "".join(sim_answer(MODEL, "Write a haiku about AI", None, 40))
    assert body["usage"]["completion_tokens"] == 40
    assert body["provider"]["region"] == "local"
    assert isinstance(body["provider"]["latency_ms"], int)


async def test_jobs_run_in_background_and_belong_to_their_account(live: LiveGateway) -> None:
    await live.add_sim_device(length=5, ttft_ms=200)
    _, key = await live.developer_key("owner")
    _, other_key = await live.developer_key("other")
    async with live.client(key) as client, live.client(other_key) as other:
        created = await client.post("/v1/jobs", json={"model": MODEL, "prompt": "queued work"})
        assert created.status_code == 202
        job = created.json()
        assert job["status"] == "queued"
        first = (await client.get(f"/v1/jobs/{job['id']}")).json()
        assert first["status"] in ("queued", "running")
        for _ in range(100):
            polled = (await client.get(f"/v1/jobs/{job['id']}")).json()
            if polled["status"] == "completed":
                break
            await asyncio.sleep(0.05)
        assert polled["status"] == "completed"
        assert polled["result"]["output"] == "".join(sim_answer(MODEL, "queued work", None, 5))
        assert polled["result"]["usage"]["completion_tokens"] == 5
        assert polled["attempts"][0]["outcome"] == "succeeded"
        hidden = await other.get(f"/v1/jobs/{job['id']}")
        assert hidden.status_code == 404
        assert hidden.json()["error"]["code"] == "NOT_FOUND"


async def test_job_with_messages_and_bad_job_bodies(live: LiveGateway) -> None:
    _, key = await live.developer_key()
    async with live.client(key) as client:
        both = await client.post(
            "/v1/jobs",
            json={"model": MODEL, "prompt": "a", "messages": [{"role": "user", "content": "b"}]},
        )
        neither = await client.post("/v1/jobs", json={"model": MODEL})
        missing = await client.get("/v1/jobs/job_doesnotexist")
    assert both.status_code == neither.status_code == 400
    assert missing.status_code == 404


async def test_admin_api_needs_the_admin_token(live: LiveGateway) -> None:
    async with live.client("wrong-token") as bad, live.client(ADMIN_TOKEN) as admin:
        refused = await bad.get("/admin/accounts")
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "INVALID_ADMIN_TOKEN"
        account = (await admin.post("/admin/accounts", json={"name": "a"})).json()
        key = (await admin.post(f"/admin/accounts/{account['id']}/keys", json={})).json()
        assert key["key"].startswith("sg_live_")
        device = (await admin.post("/admin/devices", json={"account_id": account["id"]})).json()
        assert device["token"].startswith("sg_dev_")
        listed = (await admin.get("/admin/devices")).json()["data"]
        assert [d["id"] for d in listed] == [device["id"]]
        assert listed[0]["connection"] is None
        models = (await admin.get("/admin/models")).json()["data"]
        assert {m["id"]: m["devices"] for m in models}[MODEL] == 0


async def test_health_and_docs(live: LiveGateway) -> None:
    async with live.client() as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        ready = await client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        spec = (await client.get("/openapi.json")).json()
        assert "/v1/chat/completions" in spec["paths"]
        assert (await client.get("/docs")).status_code == 200


@pytest.mark.parametrize("mode", ["live", "test"])
async def test_key_formats(live: LiveGateway, mode: str) -> None:
    from swarmgate.accounts import service

    account_id, _ = await live.developer_key()
    created = await service.create_api_key(live.gateway.engine, account_id=account_id, mode=mode)  # type: ignore[arg-type]
    assert created.secret.startswith(f"sg_{mode}_")
    assert len(created.secret) - len(f"sg_{mode}_") >= 32  # 192 random bits, url-safe
    async with live.client(created.secret) as client:
        assert (await client.get("/v1/models")).status_code == 200


async def test_admin_refuses_credit_beyond_what_the_ledger_holds(live: LiveGateway) -> None:
    async with live.client(ADMIN_TOKEN) as admin:
        response = await admin.post("/admin/accounts", json={"name": "a", "credit_micros": 2**64})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "credit_micros"


async def test_chat_jobs_are_recorded_with_their_attempts(live: LiveGateway) -> None:
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import select

    from swarmgate.store.db import as_utc
    from swarmgate.store.tables import job_attempts, jobs

    await live.add_sim_device(length=4)
    account_id, key = await live.developer_key()
    reply = await live.sdk(key).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "log me"}]
    )
    await live.gateway.job_log.flush()
    async with live.gateway.engine.connect() as conn:
        job = (await conn.execute(select(jobs).where(jobs.c.id == reply.id))).one()
        attempts = (
            await conn.execute(select(job_attempts).where(job_attempts.c.job_id == reply.id))
        ).all()
    assert job.account_id == account_id
    assert job.kind == "chat"
    assert job.status == "completed"
    assert job.stream is False
    assert job.completion_tokens == 4
    assert job.request_json is None  # synchronous jobs keep no request text
    assert job.output is None
    assert abs(as_utc(job.created_at) - datetime.now(UTC)) < timedelta(minutes=1)
    assert as_utc(job.finished_at) >= as_utc(job.created_at)
    assert [(a.attempt, a.outcome) for a in attempts] == [(1, "succeeded")]
    assert attempts[0].device_id == job.device_id


async def test_nodes_fetch_artifact_locations_with_their_device_token(live: LiveGateway) -> None:
    _, token = await live.device_token()
    _, developer_key = await live.developer_key()
    async with live.client(token) as device, live.client(developer_key) as developer:
        catalog = await device.get("/v1/nodes/catalog")
        refused = await developer.get("/v1/nodes/catalog")
    assert catalog.status_code == 200
    entries = {m["id"]: m for m in catalog.json()["data"]}
    artifact = entries[MODEL]["artifact"]
    assert artifact["sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert artifact["size_bytes"] == 98362432
    assert artifact["url"].startswith("https://")
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "INVALID_DEVICE_TOKEN"


def test_job_ids_are_unique_and_shaped_like_before() -> None:
    from swarmgate.api.running import new_job_id

    made = [new_job_id("chatcmpl-") for _ in range(10_000)]
    assert len(set(made)) == len(made)
    assert all(re.fullmatch(r"chatcmpl-[0-9a-f]{24}", job_id) for job_id in made)
