"""Cloud and hybrid models against real local OpenAI-compatible upstreams: streaming and
not, failover between upstreams, privacy_mode, BYOK through the vault, upstream errors."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import select

from swarmgate.billing.pricing import job_cost_micros
from swarmgate.catalog import Catalog, Pricing
from swarmgate.store.tables import charges
from tests.cloud.mock_upstream import GOOD_KEY, MockUpstream
from tests.conftest import MODEL, LiveGateway, fast_settings, start_gateway, stop_gateway

PRICE = {"input_per_1m_micros": 50_000, "output_per_1m_micros": 300_000}


def cloud_model(model_id: str, tier: str, *routes: tuple[str, str]) -> dict[str, Any]:
    return {
        "id": model_id,
        "description": model_id,
        "context_length": 8192,
        "tier": tier,
        "pricing": PRICE,
        "upstreams": [{"upstream": u, "model": m} for u, m in routes],
    }


def write_catalog(path: Path) -> Path:
    default = Catalog.load()
    base = default.get(MODEL)
    assert base is not None
    models = [
        base.model_dump(mode="json"),
        cloud_model("cloud-good", "cloud", ("alpha", "fine"), ("beta", "fine")),
        cloud_model("cloud-failover", "cloud", ("alpha", "down"), ("beta", "fine")),
        cloud_model("cloud-limited", "cloud", ("alpha", "rate-limited")),
        cloud_model("cloud-slow", "cloud", ("alpha", "slow")),
        cloud_model("cloud-no-usage", "cloud", ("alpha", "no-usage")),
        cloud_model("cloud-minus-one", "cloud", ("alpha", "minus-one")),
        cloud_model("cloud-unconfigured", "cloud", ("gamma", "fine")),
        cloud_model("hybrid-m", "hybrid", ("alpha", "fine")),
        cloud_model("cloud-json-only", "cloud", ("alpha", "json-only")),
        cloud_model("cloud-no-stream", "cloud", ("plain", "fine")),
        cloud_model("cloud-burst", "cloud", ("alpha", "burst")),
    ]
    path.write_bytes(orjson.dumps({"models": models}))
    return path


@pytest.fixture
async def upstreams() -> AsyncIterator[tuple[MockUpstream, MockUpstream]]:
    alpha, beta = MockUpstream("alpha"), MockUpstream("beta")
    await alpha.start()
    await beta.start()
    try:
        yield alpha, beta
    finally:
        await alpha.stop()
        await beta.stop()


@pytest.fixture
async def cloud(
    tmp_path: Path, upstreams: tuple[MockUpstream, MockUpstream]
) -> AsyncIterator[LiveGateway]:
    alpha, beta = upstreams
    settings = fast_settings(
        tmp_path,
        catalog_path=write_catalog(tmp_path / "catalog.json"),
        upstreams=[
            {"name": "alpha", "base_url": alpha.base_url, "api_key": GOOD_KEY, "timeout_s": 1.0},
            {"name": "beta", "base_url": beta.base_url, "api_key": GOOD_KEY},
            # beta again, as an upstream that is not to be asked to stream
            {"name": "plain", "base_url": beta.base_url, "api_key": GOOD_KEY, "stream": False},
        ],
        vault_master_secret="test-master-secret-0123456789abcdef",
        first_token_timeout_s=0.5,
        queue_wait_s=0.2,
    )
    live = await start_gateway(settings)
    try:
        yield live
    finally:
        await stop_gateway(live)


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello there"}], **extra}


def sse(text: str) -> list[Any]:
    return [
        line[6:] if line[6:] == "[DONE]" else orjson.loads(line[6:])
        for line in text.splitlines()
        if line.startswith("data: ")
    ]


async def test_a_cloud_model_answers_from_its_upstream(
    cloud: LiveGateway, upstreams: tuple[MockUpstream, MockUpstream]
) -> None:
    account, key = await cloud.developer_key()
    async with cloud.client(key) as client:
        reply = await client.post("/v1/chat/completions", json=chat("cloud-good"))
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["choices"][0]["message"]["content"] == "alpha says: hello there"
        assert body["swarmgate"]["inference_type"] == "cloud"
        assert body["swarmgate"]["upstream"] == "alpha" and body["swarmgate"]["byok"] is False
        assert body["usage"] == {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}

        streamed = await client.post(
            "/v1/chat/completions",
            json=chat("cloud-good", stream=True, stream_options={"include_usage": True}),
        )
        events = sse(streamed.text)
        assert events[-1] == "[DONE]"
        text = "".join(
            e["choices"][0]["delta"].get("content", "")
            for e in events
            if isinstance(e, dict) and e.get("choices")
        )
        assert text == "alpha says: hello there"
        assert events[-2]["usage"]["completion_tokens"] == 4
    assert upstreams[0].requests[0]["auth"] == f"Bearer {GOOD_KEY}"
    # Charged at the catalog's price, all of it the platform's (no device, no provider).
    await cloud.gateway.billing.writer.posted()
    async with cloud.gateway.engine.connect() as db:
        row = (await db.execute(select(charges).where(charges.c.job_id == body["id"]))).one()
    assert row.device_id is None and row.provider_micros == 0
    assert row.cost_micros == job_cost_micros(Pricing(**PRICE), 11, 4)
    assert account


async def test_failover_between_upstreams_and_errors_that_say_what_happened(
    cloud: LiveGateway, upstreams: tuple[MockUpstream, MockUpstream]
) -> None:
    _, key = await cloud.developer_key()
    async with cloud.client(key) as client:
        failover = await client.post("/v1/chat/completions", json=chat("cloud-failover"))
        assert failover.status_code == 200, failover.text
        assert failover.json()["swarmgate"]["upstream"] == "beta"
        assert failover.json()["swarmgate"]["attempts"] == 2

        limited = await client.post("/v1/chat/completions", json=chat("cloud-limited"))
        assert limited.status_code == 429
        assert limited.json()["error"]["code"] == "UPSTREAM_RATE_LIMITED"
        assert limited.json()["error"]["retry_after"] == 7
        assert limited.headers["retry-after"] == "7"

        started = time.monotonic()
        slow = await client.post("/v1/chat/completions", json=chat("cloud-slow"))
        assert time.monotonic() - started < 3
        assert slow.status_code == 504 and slow.json()["error"]["code"] == "UPSTREAM_TIMEOUT"

        missing = await client.post("/v1/chat/completions", json=chat("cloud-unconfigured"))
        assert missing.status_code == 503
        assert missing.json()["error"]["code"] == "CLOUD_UNAVAILABLE"


async def test_usage_is_counted_when_the_upstream_gives_none(cloud: LiveGateway) -> None:
    _, key = await cloud.developer_key()
    async with cloud.client(key) as client:
        for model in ("cloud-no-usage", "cloud-minus-one"):
            reply = await client.post("/v1/chat/completions", json=chat(model))
            usage = reply.json()["usage"]
            assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0, model


async def test_hybrid_uses_devices_first_then_the_cloud_and_privacy_mode_never_does(
    cloud: LiveGateway,
) -> None:
    _, key = await cloud.developer_key()
    async with cloud.client(key) as client:
        # No device: the cloud answers.
        reply = await client.post("/v1/chat/completions", json=chat("hybrid-m"))
        assert reply.status_code == 200, reply.text
        assert reply.json()["swarmgate"]["inference_type"] == "cloud"
        private = await client.post(
            "/v1/chat/completions", json=chat("hybrid-m", privacy_mode=True)
        )
        assert private.status_code == 503
        assert "privacy_mode" in private.json()["error"]["message"]
        cloud_only = await client.post(
            "/v1/chat/completions", json=chat("cloud-good", privacy_mode=True)
        )
        assert cloud_only.status_code == 400
        assert cloud_only.json()["error"]["code"] == "PRIVACY_MODE_FORBIDS_CLOUD"

    # A device serves it: devices come first.
    agent = await cloud.add_sim_device(model="hybrid-m")
    async with cloud.client(key) as client:
        reply = await client.post("/v1/chat/completions", json=chat("hybrid-m", stream=True))
        finish = [
            e
            for e in sse(reply.text)
            if isinstance(e, dict) and e.get("choices") and e["choices"][0]["finish_reason"]
        ]
        assert finish[0]["swarmgate"]["inference_type"] == "p2p"
        assert finish[0]["swarmgate"]["device_id"] == agent.stats.device_id

    # The only device is predicted slower than the request's latency budget: the cloud.
    device = cloud.gateway.registry.get(str(agent.stats.device_id))
    assert device is not None
    stats = device.profile.model_stats("hybrid-m")
    stats.ttft_ms, stats.samples = 5_000.0, 5
    cloud.gateway.registry.measured(device, "hybrid-m")
    async with cloud.client(key) as client:
        budget = await client.post(
            "/v1/chat/completions", json=chat("hybrid-m", max_latency_ms=500)
        )
        assert budget.json()["swarmgate"]["inference_type"] == "cloud"

    # Every device attempt fails: the cloud takes over (not for a private request).
    await cloud.stop_agents()
    await cloud.add_sim_device(model="hybrid-m", die_after_tokens=0)
    async with cloud.client(key) as client:
        reply = await client.post("/v1/chat/completions", json=chat("hybrid-m", stream=True))
        events = sse(reply.text)
        assert events[-1] == "[DONE]"
        finish = [
            e
            for e in events
            if isinstance(e, dict) and e.get("choices") and e["choices"][0]["finish_reason"]
        ]
        assert finish[0]["swarmgate"]["inference_type"] == "cloud"


async def test_byok_routes_through_the_accounts_own_key_for_a_fee(
    cloud: LiveGateway, upstreams: tuple[MockUpstream, MockUpstream]
) -> None:
    alpha, _beta = upstreams
    alpha.keys.add("sk-developer-own-key-1234")
    _, key = await cloud.developer_key()
    async with cloud.client(key) as client:
        stored = await client.post(
            "/v1/vault", json={"provider": "alpha", "apiKey": "sk-developer-own-key-1234"}
        )
        assert stored.status_code == 201, stored.text
        assert stored.json()["last4"] == "1234" and "apiKey" not in stored.text
        reply = await client.post("/v1/chat/completions", json=chat("cloud-good"))
        assert reply.json()["swarmgate"]["byok"] is True
        assert alpha.requests[-1]["auth"] == "Bearer sk-developer-own-key-1234"
        body = reply.json()
        await cloud.gateway.billing.writer.posted()
        async with cloud.gateway.engine.connect() as db:
            row = (await db.execute(select(charges).where(charges.c.job_id == body["id"]))).one()
        fee = cloud.gateway.cloud_price("cloud-good", byok=True)
        assert fee.output_per_1m_micros == PRICE["output_per_1m_micros"] // 10
        assert row.cost_micros == job_cost_micros(fee, 11, 4)

        # A queued job through the vault key pays the fee too.
        queued = await client.post(
            "/v1/jobs", json={"model": "cloud-good", "prompt": "hello there", "max_tokens": 20}
        )
        assert queued.status_code == 202, queued.text
        job_id = queued.json()["id"]
        for _ in range(200):
            job = (await client.get(f"/v1/jobs/{job_id}")).json()
            if job["status"] in ("completed", "failed"):
                break
            await asyncio.sleep(0.02)
        assert job["status"] == "completed", job
        await cloud.gateway.billing.writer.posted()
        async with cloud.gateway.engine.connect() as db:
            queued_row = (await db.execute(select(charges).where(charges.c.job_id == job_id))).one()
        assert queued_row.cost_micros == job_cost_micros(
            fee, queued_row.prompt_tokens, queued_row.completion_tokens
        )

        # A refused own key: a clear error naming the vault key, then the next upstream.
        await client.post("/v1/vault", json={"provider": "alpha", "apiKey": "sk-revoked-key-0000"})
        fallback = await client.post("/v1/chat/completions", json=chat("cloud-good"))
        assert fallback.status_code == 200 and fallback.json()["swarmgate"]["upstream"] == "beta"
        only_alpha = await client.post("/v1/chat/completions", json=chat("cloud-failover"))
        assert only_alpha.status_code == 200  # alpha refuses the key, beta answers

        deleted = await client.delete("/v1/vault", params={"provider": "alpha"})
        assert deleted.json()["deleted"] == 1
        assert (await client.get("/v1/vault")).json()["exists"] is False
        reply = await client.post("/v1/chat/completions", json=chat("cloud-good"))
        assert reply.json()["swarmgate"]["byok"] is False


@pytest.mark.parametrize("model", ["cloud-no-stream", "cloud-json-only"])
async def test_upstreams_that_do_not_stream(
    cloud: LiveGateway, upstreams: tuple[MockUpstream, MockUpstream], model: str
) -> None:
    """An upstream configured with ``stream: false`` is asked without streaming, and one
    that answers a streaming request with a whole JSON completion is understood; either
    way the client gets what it asked for, streamed or not."""
    _, key = await cloud.developer_key()
    speaker = "beta" if model == "cloud-no-stream" else "alpha"
    async with cloud.client(key) as client:
        whole = await client.post("/v1/chat/completions", json=chat(model))
        assert whole.status_code == 200, whole.text
        assert whole.json()["choices"][0]["message"]["content"] == f"{speaker} says: hello there"
        assert whole.json()["usage"]["completion_tokens"] == 4
        streamed = await client.post(
            "/v1/chat/completions",
            json=chat(model, stream=True, stream_options={"include_usage": True}),
        )
    events = sse(streamed.text)
    assert events[-1] == "[DONE]"
    text = "".join(
        e["choices"][0]["delta"].get("content", "")
        for e in events
        if isinstance(e, dict) and e.get("choices")
    )
    assert text == f"{speaker} says: hello there"
    assert events[-2]["usage"]["completion_tokens"] == 4
    sent = [r["stream"] for r in upstreams[1 if speaker == "beta" else 0].requests]
    # A client that does not stream gets a whole answer asked of any upstream; a streaming
    # one is streamed from an upstream that can.
    assert sent == ([False, False] if model == "cloud-no-stream" else [False, True])


async def test_a_stream_that_arrives_in_one_read_is_relayed_whole_and_charged_once(
    cloud: LiveGateway, upstreams: tuple[MockUpstream, MockUpstream]
) -> None:
    """The upstream's chunks that arrive together go to the client as one content chunk:
    the text in order, then the finish reason, usage and [DONE]; one charge, at the
    upstream's usage."""
    _, key = await cloud.developer_key()
    async with cloud.client(key) as client:
        streamed = await client.post(
            "/v1/chat/completions",
            json=chat("cloud-burst", stream=True, stream_options={"include_usage": True}),
        )
    assert streamed.status_code == 200, streamed.text
    assert streamed.text.endswith("data: [DONE]\n\n")
    events = sse(streamed.text)
    *chunks, closing, usage, done = events
    assert done == "[DONE]"
    assert [c["choices"][0]["delta"] for c in chunks] == [
        {"role": "assistant", "content": "alpha says: hello there"}
    ]
    assert closing["choices"][0]["finish_reason"] == "stop"
    assert closing["swarmgate"]["inference_type"] == "cloud"
    assert usage["usage"] == {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15}
    assert {e["id"] for e in events if isinstance(e, dict)} == {chunks[0]["id"]}
    await cloud.gateway.billing.writer.posted()
    async with cloud.gateway.engine.connect() as db:
        rows = (await db.execute(select(charges).where(charges.c.job_id == chunks[0]["id"]))).all()
    assert len(rows) == 1
    assert rows[0].cost_micros == job_cost_micros(Pricing(**PRICE), 11, 4)
    assert upstreams[0].requests[-1]["stream"] is True


async def test_a_vault_base_url_is_called_at_the_address_that_was_checked(
    tmp_path: Path, upstreams: tuple[MockUpstream, MockUpstream]
) -> None:
    """A developer's baseUrl goes through the address guard on every call: the request
    reaches the checked address with the original Host header; when the operator does
    not allow private addresses, a stored URL that now points at one is refused at call
    time (not only when saved) and the next upstream answers."""
    alpha, beta = upstreams
    beta.keys.add("sk-developer-own-key-1234")
    for allow_private in (True, False):
        settings = fast_settings(
            tmp_path / str(allow_private),
            catalog_path=write_catalog(tmp_path / "catalog.json"),
            upstreams=[
                {"name": "alpha", "base_url": alpha.base_url, "api_key": GOOD_KEY},
                {"name": "beta", "base_url": beta.base_url, "api_key": GOOD_KEY},
            ],
            vault_master_secret="test-master-secret-0123456789abcdef",
            vault_allow_private_urls=allow_private,
        )
        live = await start_gateway(settings)
        try:
            account_id, key = await live.developer_key()
            # The developer's key for "alpha", with a base URL that is really beta's server.
            own_url = f"http://localhost:{beta.port}/v1"
            await live.gateway.vault.put(account_id, "alpha", "sk-developer-own-key-1234", own_url)
            async with live.client(key) as client:
                reply = await client.post("/v1/chat/completions", json=chat("cloud-good"))
            assert reply.status_code == 200, reply.text
            info = reply.json()["swarmgate"]
            if allow_private:
                assert reply.json()["choices"][0]["message"]["content"].startswith("beta says")
                assert info["upstream"] == "alpha" and info["byok"] is True
                assert beta.requests[-1]["host"] == f"localhost:{beta.port}"
                assert beta.requests[-1]["auth"] == "Bearer sk-developer-own-key-1234"
            else:
                # Refused before any byte left: the next upstream, with the gateway's key.
                assert info["upstream"] == "beta" and info["byok"] is False
                assert beta.requests[-1]["auth"] == f"Bearer {GOOD_KEY}"
        finally:
            await stop_gateway(live)


@pytest.mark.parametrize("stream", [False, True])
async def test_every_cloud_answer_under_load_is_charged_once(
    cloud: LiveGateway, upstreams: tuple[MockUpstream, MockUpstream], stream: bool
) -> None:
    _account, key = await cloud.developer_key()
    answered: list[str] = []

    async def worker(client: Any) -> None:
        for _ in range(25):
            response = await client.post(
                "/v1/chat/completions", json=chat("cloud-good", stream=stream)
            )
            assert response.status_code == 200, response.text
            if stream:
                events = sse(response.text)
                assert events[-1] == "[DONE]"
                answered.append(events[0]["id"])
            else:
                answered.append(response.json()["id"])

    async with cloud.client(key) as client:
        await asyncio.gather(*(worker(client) for _ in range(16)))
    await cloud.gateway.billing.writer.posted()
    async with cloud.gateway.engine.connect() as db:
        charged = [row.job_id for row in await db.execute(select(charges.c.job_id))]
    assert len(answered) == 400
    assert sorted(charged) == sorted(answered)
    assert len(upstreams[0].requests) == 400
