"""Known-answer canaries: compared with a tolerance, a liar caught within a bounded number,
honest devices (simulated and real llama.cpp) never flagged."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from swarmgate.node.agent import NodeAgent
from swarmgate.routing.registry import DeviceConnection
from swarmgate.trust.canary import PASS_SIMILARITY, CanarySet, similarity
from swarmgate.trust.score import SUSPEND_AT
from tests.conftest import MODEL, LiveGateway, fast_settings, start_gateway, stop_gateway

CANARIES = CanarySet.load()


@pytest.mark.parametrize(
    ("reference", "answer", "passes"),
    [
        ("The capital of France is Paris.", "The capital of France is Paris.", True),
        # llama.cpp on another machine: a word differs late, or the answer runs on.
        ("The capital of France is Paris.", "The capital of France is Paris!", True),
        (
            "1. 1\n2. 2\n3. 3\n4. 4\n5. 5",
            "1. 1\n2. 2\n3. 3\n4. 4\n5. 5\n6. 6",
            True,
        ),
        (
            "The sea is a vast and mysterious realm, teeming with life and full of wonders",
            "The sea is a vast and mysterious place, teeming with life and full of secrets",
            True,
        ),
        # Stopping early is fine as long as enough was said.
        (
            "The sea is a vast and mysterious realm, teeming with life and full of wonders",
            "The sea is a vast and mysterious realm, teeming",
            True,
        ),
        # A different model: a different answer.
        ("The capital of France is Paris.", "Bonjour! How can I help you today?", False),
        (
            "The four seasons of the year are: Spring, Summer, Autumn and Winter",
            "Seasons change because the Earth is tilted on its axis as it orbits",
            False,
        ),
        # Saying almost nothing is not agreeing.
        ("The quick brown fox is a classic example of a lazy person.", "The", False),
        ("The quick brown fox is a classic example of a lazy person.", "", False),
    ],
)
def test_similarity_tolerates_drift_but_not_another_model(
    reference: str, answer: str, passes: bool
) -> None:
    assert (similarity(reference, answer) >= PASS_SIMILARITY) is passes


def test_the_shipped_references_cover_the_bundled_model() -> None:
    assert CANARIES.covers(MODEL, "llama-cpp") and CANARIES.covers(MODEL, "sim")
    assert not CANARIES.covers(MODEL, "openai-http")
    for index in range(len(CANARIES.prompts)):
        assert CANARIES.reference(MODEL, "llama-cpp", index)


def _conn(live: LiveGateway, agent: NodeAgent) -> DeviceConnection:
    assert agent.stats.device_id is not None
    found = live.gateway.registry.get(agent.stats.device_id)
    assert found is not None
    return found


async def test_a_liar_is_caught_and_honest_devices_never_are(live: LiveGateway) -> None:
    honest = [_conn(live, await live.add_sim_device(length=24)) for _ in range(2)]
    short = _conn(live, await live.add_sim_device(length=10))  # an honest, terse device
    liar = _conn(live, await live.add_sim_device(serve_as="liar/other-model"))
    runner = live.gateway.canaries
    runner._rng = random.Random(5)
    rounds_to_catch = None
    for round_number in range(1, 41):
        outcomes = await runner.run_round()
        assert outcomes, "every idle device gets a canary each round"
        if rounds_to_catch is None and liar.profile.suspended_reason is not None:
            rounds_to_catch = round_number
    # Every canary the liar answers is wrong: SUSPEND_AT of them suspend it.
    assert rounds_to_catch == SUSPEND_AT
    assert liar.profile.canaries_failed == SUSPEND_AT and not liar.accepting
    for device in [*honest, short]:
        assert device.profile.canaries_passed == 40
        assert device.profile.canaries_failed == 0 and device.profile.suspicions == 0


@pytest.fixture
async def patient(tmp_path: Path) -> AsyncIterator[LiveGateway]:
    """A gateway that waits for a real model on a busy 2-core box."""
    live = await start_gateway(
        fast_settings(tmp_path, first_token_timeout_s=60.0, token_stall_timeout_s=60.0)
    )
    try:
        yield live
    finally:
        await stop_gateway(live)


@pytest.mark.llama
async def test_honest_llama_cpp_devices_pass_every_canary(patient: LiveGateway) -> None:
    live = patient
    pytest.importorskip("llama_cpp")
    from swarmgate.node.backends.llama_cpp import LlamaCppBackend
    from swarmgate.protocol import DeviceFacts

    device_id, token = await live.device_token()
    agent = NodeAgent(
        gateway_url=live.ws_url,
        token=token,
        backend=LlamaCppBackend(n_ctx=512, n_threads=2),
        models=[MODEL],
        facts=DeviceFacts(os="linux", cpu="test", ram_mb=1024),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    live.agents.append((agent, stop, task))
    await live.wait_for_device(device_id, timeout=120)
    device = live.gateway.registry.get(device_id)
    assert device is not None and device.profile.engine == "llama-cpp"
    runner = live.gateway.canaries
    for _ in range(2 * len(CANARIES.prompts)):
        outcome = await runner.probe(device, MODEL)
        assert outcome.passed, outcome
    assert device.profile.canaries_failed == 0 and device.profile.suspicions == 0
