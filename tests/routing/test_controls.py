"""Every routing control, through the HTTP API and the OpenAI SDK, changes which device
serves — or fails fast with the code of the constraint that emptied the field."""

from __future__ import annotations

import time
from typing import Any

import pytest
from sqlalchemy import select

from swarmgate.accounts import service
from swarmgate.billing.pricing import job_cost_micros
from swarmgate.catalog import Pricing
from swarmgate.node.agent import NodeAgent
from swarmgate.routing.profile import MEASURED_AFTER
from swarmgate.routing.registry import DeviceConnection
from swarmgate.store.tables import charges
from tests.conftest import ADMIN_TOKEN, MODEL, LiveGateway

OTHER = "qwen2.5-0.5b-instruct-q6_k"
CHAT: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}


def conn(live: LiveGateway, agent: NodeAgent) -> DeviceConnection:
    device_id = agent.stats.device_id
    assert device_id is not None
    found = live.gateway.registry.get(device_id)
    assert found is not None
    return found


def measure(live: LiveGateway, device: DeviceConnection, ttft: float, tps: float = 50.0) -> None:
    """Gives the device observed stats, as if it had served a few jobs."""
    for model in device.models:
        stats = device.profile.model_stats(model)
        stats.ttft_ms, stats.tokens_per_s, stats.samples = ttft, tps, MEASURED_AFTER
        live.gateway.registry.measured(device, model)


async def two_devices(live: LiveGateway) -> tuple[DeviceConnection, DeviceConnection]:
    a = conn(live, await live.add_sim_device())
    b = conn(live, await live.add_sim_device())
    measure(live, a, 100)
    measure(live, b, 100)
    return a, b


async def served_by(live: LiveGateway, key: str, **fields: Any) -> str:
    async with live.client(key) as client:
        response = await client.post("/v1/chat/completions", json={**CHAT, **fields})
    assert response.status_code == 200, response.text
    return str(response.json()["swarmgate"]["device_id"])


async def refused(live: LiveGateway, key: str, **fields: Any) -> dict[str, Any]:
    started = time.monotonic()
    async with live.client(key) as client:
        response = await client.post("/v1/chat/completions", json={**CHAT, **fields})
    assert time.monotonic() - started < 1.0, "a request no device can serve must fail fast"
    assert response.status_code == 503, response.text
    error: dict[str, Any] = response.json()["error"]
    return error


async def set_price(live: LiveGateway, device: DeviceConnection, price: Pricing) -> None:
    await live.gateway.trust.set_prices(device.device_id, [(MODEL, price)])
    live.gateway.registry.repriced(device)


CATALOG = Pricing(input_per_1m_micros=10_000, output_per_1m_micros=20_000)
CHEAP = Pricing(input_per_1m_micros=6_000, output_per_1m_micros=12_000)
DEAR = Pricing(input_per_1m_micros=18_000, output_per_1m_micros=38_000)


async def test_tiers_choose_by_price_and_by_speed(live: LiveGateway) -> None:
    _, key = await live.developer_key()
    a, b = await two_devices(live)
    measure(live, a, 20)  # a is fast
    measure(live, b, 600)
    await set_price(live, a, DEAR)
    await set_price(live, b, CHEAP)  # b is cheap
    for _ in range(3):
        assert await served_by(live, key, tier="fastest") == a.device_id
        assert await served_by(live, key, tier="cheapest") == b.device_id


async def test_the_hold_covers_the_dearest_candidate_and_the_charge_uses_the_servers_price(
    live: LiveGateway,
) -> None:
    account, key = await live.developer_key()
    a, b = await two_devices(live)
    await set_price(live, a, DEAR)
    await set_price(live, b, CHEAP)
    async with live.client(key) as client:
        response = await client.post(
            "/v1/chat/completions", json={**CHAT, "tier": "cheapest", "max_tokens": 50}
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["swarmgate"]["device_id"] == b.device_id
    usage = body["usage"]
    await live.gateway.billing.writer.posted()
    async with live.gateway.engine.connect() as db:
        row = (await db.execute(select(charges).where(charges.c.job_id == body["id"]))).one()
    assert row.device_id == b.device_id
    assert row.cost_micros == job_cost_micros(
        CHEAP, usage["prompt_tokens"], usage["completion_tokens"]
    )
    # A max_price below the cheap device's price leaves nobody.
    error = await refused(
        live, key, max_price={"input_per_1m_micros": 1_000, "output_per_1m_micros": 1_000}
    )
    assert error["code"] == "PRICE_ABOVE_MAX" and error["param"] == "max_price"
    # Within max_price: only the cheap one qualifies, whatever the tier.
    limit = {"input_per_1m_micros": 10_000, "output_per_1m_micros": 20_000}
    measure(live, a, 1)
    assert await served_by(live, key, tier="fastest", max_price=limit) == b.device_id
    assert account


async def test_providers_set_prices_within_the_gateways_bounds(live: LiveGateway) -> None:
    device_id, _token = await live.device_token()
    async with live.gateway.engine.connect() as db:
        from swarmgate.store.tables import devices

        owner = (
            await db.execute(select(devices.c.account_id).where(devices.c.id == device_id))
        ).scalar_one()
    provider_key = (await service.create_api_key(live.gateway.engine, account_id=owner)).secret
    _, stranger = await live.developer_key("stranger")
    url = f"/v1/provider/devices/{device_id}/prices"
    async with live.client(provider_key) as client:
        ok = await client.put(
            url,
            json={
                "prices": {MODEL: {"input_per_1m_micros": 15_000, "output_per_1m_micros": 30_000}}
            },
        )
        assert ok.status_code == 200, ok.text
        assert ok.json()["prices"][MODEL]["output_per_1m_micros"] == 30_000
        too_high = await client.put(
            url,
            json={"prices": {MODEL: {"input_per_1m_micros": 10_000, "output_per_1m_micros": 1}}},
        )
        assert too_high.status_code == 400
        assert "bounds" in too_high.json()["error"]["message"]
        as_float = await client.put(
            url,
            json={"prices": {MODEL: {"input_per_1m_micros": 1.5, "output_per_1m_micros": 2}}},
        )
        assert as_float.status_code == 400
        reset = await client.put(url, json={"prices": {MODEL: None}})
        assert reset.json()["prices"] == {}
    async with live.client(stranger) as client:
        other = await client.put(url, json={"prices": {MODEL: None}})
    assert other.status_code == 404


async def test_trusted_only_and_verified(live: LiveGateway) -> None:
    _, key = await live.developer_key()
    a, b = await two_devices(live)
    measure(live, a, 10)  # a would win on speed
    assert (await refused(live, key, trusted_only=True))["code"] == "NO_TRUSTED_DEVICE"
    error = await refused(live, key, privacyLevel="verified")
    assert error["code"] == "NO_VERIFIED_DEVICE" and error["param"] == "privacyLevel"

    profile = b.profile
    profile.jobs_served, profile.canaries_passed = 2_000, 40
    profile.registered_at = time.time() - 60 * 86_400
    assert live.gateway.trust.rescore(profile) > 0.8
    assert await served_by(live, key, trusted_only=True) == b.device_id

    async with live.client(ADMIN_TOKEN) as admin:
        verified = await admin.post(f"/admin/devices/{a.device_id}/verify", json={})
    assert verified.status_code == 200 and verified.json()["verified"] is True
    assert await served_by(live, key, privacyLevel="verified") == a.device_id
    assert await served_by(live, key, privacy_level="verified") == a.device_id
    # Both constraints at once: nobody is both trusted and verified yet.
    assert (await refused(live, key, trusted_only=True, privacy_level="verified"))["code"] in (
        "NO_TRUSTED_DEVICE",
        "NO_VERIFIED_DEVICE",
    )


async def test_allow_and_deny_hosters_by_device_and_by_provider(live: LiveGateway) -> None:
    _, key = await live.developer_key()
    a, b = await two_devices(live)
    measure(live, a, 10)
    assert await served_by(live, key) == a.device_id
    assert await served_by(live, key, allow_hosters=[b.device_id]) == b.device_id
    assert await served_by(live, key, allow_hosters=[b.account_id]) == b.device_id
    assert await served_by(live, key, deny_hosters=[a.device_id]) == b.device_id
    assert await served_by(live, key, deny_hosters=[a.account_id]) == b.device_id
    error = await refused(live, key, deny_hosters=[a.device_id, b.account_id])
    assert error["code"] == "NO_ALLOWED_HOSTER"
    assert (await refused(live, key, allow_hosters=["dev_nobody"]))["code"] == "NO_ALLOWED_HOSTER"


async def test_max_latency_skips_slow_devices(live: LiveGateway) -> None:
    _, key = await live.developer_key()
    a, b = await two_devices(live)
    measure(live, a, 900, tps=500)  # quick overall, slow to start
    measure(live, b, 100, tps=20)
    assert await served_by(live, key, tier="fastest", max_tokens=200) == a.device_id
    assert (
        await served_by(live, key, tier="fastest", max_tokens=200, max_latency_ms=400)
        == b.device_id
    )
    assert (await refused(live, key, max_latency_ms=50))["code"] == "LATENCY_ABOVE_MAX"


async def test_fallback_models_and_auto(live: LiveGateway) -> None:
    _, key = await live.developer_key()
    other = conn(live, await live.add_sim_device(model=OTHER))
    async with live.client(key) as client:
        warming = await client.post("/v1/chat/completions", json=CHAT)
        assert warming.status_code == 503 and warming.json()["error"]["code"] == "model_warming"
        fallback = await client.post(
            "/v1/chat/completions", json={**CHAT, "fallback_models": [OTHER]}
        )
        assert fallback.status_code == 200, fallback.text
        assert fallback.json()["model"] == OTHER
        assert fallback.json()["swarmgate"]["device_id"] == other.device_id
        unknown = await client.post(
            "/v1/chat/completions", json={**CHAT, "fallback_models": ["no-such-model"]}
        )
        assert unknown.status_code == 404
        assert unknown.json()["error"]["param"] == "fallback_models[0]"
        auto = await client.post("/v1/chat/completions", json={**CHAT, "model": "auto"})
        assert auto.status_code == 200, auto.text
        assert auto.json()["model"] == OTHER

    # With both models served, "auto" takes the best device for the tier.
    mine = conn(live, await live.add_sim_device())
    measure(live, mine, 10)
    measure(live, other, 800)
    async with live.client(key) as client:
        fast = await client.post(
            "/v1/chat/completions", json={**CHAT, "model": "auto", "tier": "fastest"}
        )
    assert fast.json()["model"] == MODEL


async def test_the_openai_sdk_passes_routing_controls(live: LiveGateway) -> None:
    _, key = await live.developer_key()
    a, b = await two_devices(live)
    measure(live, a, 10)
    sdk = live.sdk(key)
    reply = await sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        extra_body={"deny_hosters": [a.device_id], "tier": "cheapest"},
    )
    assert reply.model_extra is not None
    assert reply.model_extra["swarmgate"]["device_id"] == b.device_id


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tier", "quickest"),
        ("trusted_only", "yes"),
        ("max_latency_ms", 0),
        ("fallback_models", "m"),
        ("allow_hosters", [1]),
        ("privacyLevel", "secret"),
        ("max_price", {"input_per_1m_micros": -1}),
        ("max_price", {"bogus": 1}),
    ],
)
async def test_bad_routing_controls_are_400s_that_name_the_field(
    live: LiveGateway, field: str, value: object
) -> None:
    _, key = await live.developer_key()
    async with live.client(key) as client:
        response = await client.post("/v1/chat/completions", json={**CHAT, field: value})
    assert response.status_code == 400, response.text
    assert str(response.json()["error"]["param"]).startswith(field)
