"""The trust score's formula, suspicions that suspend a device, the admin's clearance,
and a profile that survives reconnects and restarts."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path

import pytest

from swarmgate.routing.profile import DeviceProfile
from swarmgate.routing.registry import DeviceConnection
from swarmgate.trust.score import SUSPEND_AT, trust_score
from tests.conftest import (
    ADMIN_TOKEN,
    MODEL,
    LiveGateway,
    fast_settings,
    start_gateway,
    stop_gateway,
)

NOW = 1_800_000_000.0
DAY = 86_400.0


def profile(**fields: object) -> DeviceProfile:
    p = DeviceProfile(device_id="d", account_id="a")
    for name, value in fields.items():
        setattr(p, name, value)
    return p


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, 0.0),
        ({"registered_at": NOW - 30 * DAY}, 0.15),
        ({"registered_at": NOW - 15 * DAY}, 0.075),
        ({"jobs_served": 95}, 0.38),  # 0.4 * 95 / 100
        ({"canaries_passed": 8}, 0.24),  # 0.3 * 8 / 10
        ({"canaries_passed": 8, "canaries_failed": 1}, 0.12),  # 0.3 * 8 / 20
        ({"verified": True}, 0.15),
        ({"jobs_served": 95, "suspicions": 1}, 0.28),
        ({"suspicions": 2}, 0.0),  # never below 0
        (
            {
                "registered_at": NOW - 60 * DAY,
                "jobs_served": 995,
                "canaries_passed": 48,
                "verified": True,
            },
            0.986,  # 0.398 + 0.15 + 0.288 + 0.15
        ),
        (
            # A long clean record is trusted without an attestation...
            {"registered_at": NOW - 60 * DAY, "jobs_served": 995, "canaries_passed": 48},
            0.836,
        ),
        (
            # ...but one failed canary among them is enough to lose it.
            {
                "registered_at": NOW - 60 * DAY,
                "jobs_served": 995,
                "canaries_passed": 48,
                "canaries_failed": 1,
            },
            0.788,  # 0.398 + 0.15 + 0.3 * 48 / 60
        ),
    ],
)
def test_trust_score_formula(fields: dict[str, object], expected: float) -> None:
    assert trust_score(profile(**fields), NOW) == pytest.approx(expected, abs=1e-3)


def test_the_score_is_monotonic_in_good_and_bad_evidence() -> None:
    base = profile(registered_at=NOW - 10 * DAY, jobs_served=50, canaries_passed=3)
    score = trust_score(base, NOW)
    for better in ("jobs_served", "canaries_passed"):
        assert trust_score(replace(base, **{better: 60}), NOW) > score
    for worse in ("jobs_failed", "canaries_failed", "suspicions"):
        assert trust_score(replace(base, **{worse: 1}), NOW) < score


def _conn(live: LiveGateway, device_id: str) -> DeviceConnection:
    found = live.gateway.registry.get(device_id)
    assert found is not None
    return found


async def test_suspicions_suspend_a_device_until_an_admin_clears_it(live: LiveGateway) -> None:
    _, key = await live.developer_key()
    agent = await live.add_sim_device()
    device_id = agent.stats.device_id
    assert device_id is not None
    device = _conn(live, device_id)
    for _ in range(SUSPEND_AT - 1):
        live.gateway.trust.suspect(device.profile, "too_fast")
    assert device.profile.suspended_reason is None and device.accepting
    live.gateway.trust.suspect(device.profile, "canary_failed")
    assert device.profile.suspended_reason is not None and not device.accepting

    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    async with live.client(key) as client:
        started = time.monotonic()
        refused = await client.post("/v1/chat/completions", json=chat)
        assert time.monotonic() - started < 1.0
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "NO_DEVICE_AVAILABLE"
    async with live.client(ADMIN_TOKEN) as admin:
        trust = (await admin.get(f"/admin/devices/{device_id}/trust")).json()
        assert trust["suspended"] is True and trust["suspicions"] == SUSPEND_AT
        assert trust["last_suspicion"] == "canary_failed"
        cleared = await admin.post(f"/admin/devices/{device_id}/clear")
        assert cleared.status_code == 200 and cleared.json()["suspended"] is False
    async with live.client(key) as client:
        assert (await client.post("/v1/chat/completions", json=chat)).status_code == 200


async def test_an_impossibly_fast_device_is_suspected_but_a_simulated_one_is_not(
    live: LiveGateway,
) -> None:
    agent = await live.add_sim_device()
    device_id = agent.stats.device_id
    assert device_id is not None
    device = _conn(live, device_id)
    book = live.gateway.trust
    device.profile.engine = "sim"
    book.succeeded(device, MODEL, 1.0, 200, 0.001, 0.002)
    assert device.profile.suspicions == 0
    device.profile.engine = "llama-cpp"
    book.succeeded(device, MODEL, 1.0, 8, 0.0001, 0.0002)  # too short to judge
    assert device.profile.suspicions == 0
    book.succeeded(device, MODEL, 100.0, 200, 0.5, 0.6)  # 333 tokens/s: fine
    assert device.profile.suspicions == 0
    book.succeeded(device, MODEL, 1.0, 200, 0.01, 0.02)  # 10,000 tokens/s
    assert device.profile.suspicions == 1 and device.profile.last_suspicion == "too_fast"


async def test_a_streak_of_aborted_jobs_is_a_suspicion(live: LiveGateway) -> None:
    agent = await live.add_sim_device()
    device_id = agent.stats.device_id
    assert device_id is not None
    device = _conn(live, device_id)
    for i in range(1, 11):
        live.gateway.trust.failed(device, MODEL, "failed", time.monotonic())
        assert device.profile.suspicions == i // 5
    assert device.profile.last_suspicion == "aborted_jobs"
    # A device that declines jobs (paused) is not suspected.
    live.gateway.trust.failed(device, MODEL, "refused", time.monotonic())
    assert device.profile.consecutive_failures == 10


async def test_a_profile_survives_reconnects_and_restarts(tmp_path: Path) -> None:
    live = await start_gateway(fast_settings(tmp_path))
    try:
        _, key = await live.developer_key()
        agent = await live.add_sim_device()
        device_id = agent.stats.device_id
        assert device_id is not None
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        async with live.client(key) as client:
            for _ in range(3):
                assert (await client.post("/v1/chat/completions", json=chat)).status_code == 200
        first = _conn(live, device_id)
        live.gateway.trust.canary_result(first.profile, True)
        assert first.profile.stats[MODEL].samples == 3
        await live.stop_agents()
        await live.add_sim_device(token=agent.token)  # the same device connects again
        again = _conn(live, device_id)
        assert again is not first and again.profile is first.profile
        score = again.profile.trust
    finally:
        await stop_gateway(live)
    live = await start_gateway(fast_settings(tmp_path))
    try:
        async with live.client(ADMIN_TOKEN) as admin:
            trust = (await admin.get(f"/admin/devices/{device_id}/trust")).json()
        assert trust["jobs_served"] == 3 and trust["canaries_passed"] == 1
        assert trust["trust_score"] == pytest.approx(score, abs=1e-3)
    finally:
        await stop_gateway(live)
    await asyncio.sleep(0)
