"""Failover over real sockets with simulated devices that die, stall or hang."""

from __future__ import annotations

import asyncio
import time

import httpx
import orjson
from sqlalchemy import select

from swarmgate.routing.profile import MEASURED_AFTER
from swarmgate.store.tables import job_attempts, jobs
from tests.conftest import MODEL, LiveGateway

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "fail over please"}]}


async def _attempts_of(live: LiveGateway, job_id: str) -> list[str]:
    for _ in range(100):
        async with live.gateway.engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(job_attempts.c.outcome)
                    .where(job_attempts.c.job_id == job_id)
                    .order_by(job_attempts.c.attempt)
                )
            ).all()
        if rows:
            return [r.outcome for r in rows]
        await asyncio.sleep(0.02)
    return []


def _sse_events(text: str) -> list[dict | str]:
    events: list[dict | str] = []
    for line in text.splitlines():
        if line.startswith("data: "):
            data = line[6:]
            events.append(data if data == "[DONE]" else orjson.loads(data))
    return events


async def test_three_faulty_devices_and_one_healthy_every_request_completes(
    live: LiveGateway,
) -> None:
    await live.add_sim_device(die_after_tokens=0, length=8)  # dies before its first token
    await live.add_sim_device(die_after_tokens=3, length=8)  # dies mid-answer
    await live.add_sim_device(hang=True)  # accepts jobs, never answers
    await live.add_sim_device(length=8)  # healthy
    _, key = await live.developer_key()

    async def one(client: httpx.AsyncClient, stream: bool) -> tuple[str, list[str]]:
        started = time.monotonic()
        response = await client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
        assert time.monotonic() - started < 12, "a request took longer than the failover budget"
        if not stream:
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["usage"]["completion_tokens"] == 8
            return body["id"], ["ok"]
        assert response.status_code == 200, response.text
        events = _sse_events(response.text)
        errors = [e for e in events if isinstance(e, dict) and "error" in e]
        if errors:
            # Tokens had reached the client, then the device died: the documented ending.
            assert errors[0]["error"]["code"] == "STREAM_INTERRUPTED"
            return events[0]["id"], ["interrupted"]  # type: ignore[index]
        assert events[-1] == "[DONE]"
        return events[0]["id"], ["ok"]  # type: ignore[index]

    async with live.client(key) as client:
        results = await asyncio.wait_for(
            asyncio.gather(*(one(client, stream=i % 2 == 1) for i in range(16))), 60
        )
    non_streamed = [job_id for i, (job_id, _) in enumerate(results) if i % 2 == 0]
    assert len(non_streamed) == 8
    # Every request's attempts are on record, and retried ones show what went wrong.
    outcomes = [await _attempts_of(live, job_id) for job_id, _ in results]
    assert all(o for o in outcomes)
    for o, (_, ending) in zip(outcomes, results, strict=True):
        if ending == ["ok"]:
            assert o[-1] == "succeeded"
            # "interrupted": a stream cut mid-answer and continued on another device.
            assert set(o[:-1]) <= {"gone", "timeout", "failed", "interrupted"}
        else:
            assert "interrupted" in o
    assert any(len(o) > 1 for o in outcomes), "no request exercised failover"


async def test_only_faulty_devices_ends_with_all_attempts_failed(live: LiveGateway) -> None:
    await live.add_sim_device(die_after_tokens=0)
    await live.add_sim_device(die_after_tokens=3)
    await live.add_sim_device(hang=True)
    _, key = await live.developer_key()
    async with live.client(key) as client:
        started = time.monotonic()
        response = await client.post("/v1/chat/completions", json=CHAT)
        elapsed = time.monotonic() - started
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "ALL_ATTEMPTS_FAILED"
    assert "not charged" in error["message"]
    assert response.headers["retry-after"] == "1"
    assert elapsed < 8
    async with live.gateway.engine.connect() as conn:
        await asyncio.sleep(0.1)
        job = (await conn.execute(select(jobs).where(jobs.c.status == "failed"))).first()
    assert job is not None and job.error_code == "ALL_ATTEMPTS_FAILED"
    assert sorted(await _attempts_of(live, job.id)) == ["gone", "gone", "timeout"]


async def test_hanging_device_alone_times_out_with_408(live: LiveGateway) -> None:
    await live.add_sim_device(hang=True)
    _, key = await live.developer_key()
    async with live.client(key) as client:
        started = time.monotonic()
        response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 408
    assert response.json()["error"]["code"] == "REQUEST_TIMEOUT"
    assert time.monotonic() - started < 4


async def test_stream_that_dies_after_tokens_ends_with_error_event(live: LiveGateway) -> None:
    await live.add_sim_device(die_after_tokens=4, length=10)
    _, key = await live.developer_key()
    async with live.client(key) as client:
        response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    events = _sse_events(response.text)
    contents = [
        e["choices"][0]["delta"].get("content")
        for e in events
        if isinstance(e, dict) and e.get("choices")
    ]
    assert len(contents) == 4
    assert events[-1]["error"]["code"] == "STREAM_INTERRUPTED"  # type: ignore[index]
    assert "[DONE]" not in events


async def test_stream_fails_over_when_device_dies_before_first_token(live: LiveGateway) -> None:
    await live.add_sim_device(length=5)
    healthy = live.gateway.registry.devices()[0]
    dying_agent = await live.add_sim_device(die_after_tokens=0, length=5)
    assert dying_agent.stats.device_id is not None
    dying = live.gateway.registry.get(dying_agent.stats.device_id)
    assert dying is not None
    # So the dying device, faster on paper, is tried first.
    for device, ttft in ((healthy, 10_000.0), (dying, 1.0)):
        stats = device.profile.model_stats(MODEL)
        stats.ttft_ms, stats.samples = ttft, MEASURED_AFTER
        live.gateway.registry.measured(device, MODEL)
    _, key = await live.developer_key()
    async with live.client(key) as client:
        response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    events = _sse_events(response.text)
    assert events[-1] == "[DONE]"
    finish = [e for e in events if isinstance(e, dict) and e["choices"][0]["finish_reason"]]
    assert finish[0]["swarmgate"]["attempts"] == 2
    assert finish[0]["swarmgate"]["device_id"] == healthy.device_id
    outcomes = await _attempts_of(live, finish[0]["id"])
    assert outcomes == ["gone", "succeeded"]


async def test_client_disconnect_cancels_the_job_on_the_device(live: LiveGateway) -> None:
    agent = await live.add_sim_device(tokens_per_s=20, length=200)
    _, key = await live.developer_key()
    async with (
        live.client(key) as client,
        client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as response,
    ):
        async for line in response.aiter_lines():
            if '"content"' in line:
                break
    device = live.gateway.registry.devices()[0]
    for _ in range(100):
        if not device.active and not agent._jobs:
            break
        await asyncio.sleep(0.02)
    assert device.active == {}, "gateway still holds the slot"
    assert agent._jobs == {}, "the device is still generating"


async def test_busy_devices_queue_briefly_then_answer_503_with_retry_after(
    live: LiveGateway,
) -> None:
    await live.add_sim_device(ttft_ms=800, length=1)
    _, key = await live.developer_key()
    async with live.client(key) as client:
        first = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
        await asyncio.sleep(0.1)
        second = await client.post("/v1/chat/completions", json=CHAT)
        assert second.status_code == 503
        assert second.json()["error"]["code"] == "DEVICES_BUSY"
        assert second.headers["retry-after"] == "1"
        assert (await first).status_code == 200


async def test_queued_request_gets_the_slot_when_it_frees(live: LiveGateway) -> None:
    await live.add_sim_device(ttft_ms=200, length=1)
    _, key = await live.developer_key()
    async with live.client(key) as client:
        first, second = await asyncio.gather(
            client.post("/v1/chat/completions", json=CHAT),
            client.post("/v1/chat/completions", json=CHAT),
        )
    assert first.status_code == second.status_code == 200


async def test_model_without_devices_is_warming(live: LiveGateway) -> None:
    _, key = await live.developer_key()
    async with live.client(key) as client:
        response = await client.post(
            "/v1/chat/completions", json={**CHAT, "model": "mistral-7b-instruct-q4_k_m"}
        )
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "model_warming"
    assert int(response.headers["retry-after"]) > 0
