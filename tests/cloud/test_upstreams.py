"""``Upstreams.stream`` against a local OpenAI-compatible server: what a streamed answer
becomes (deltas, usage, finish reason), and the connection it leaves for the next call."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from swarmgate.catalog import CatalogModel, Pricing, UpstreamModel
from swarmgate.protocol import ChatMessage, Delta, Done, SamplingParams
from swarmgate.upstreams import CloudRun, UpstreamConfig, Upstreams
from tests.cloud.mock_upstream import GOOD_KEY, MockUpstream

MESSAGES = (ChatMessage(role="user", content="hello there"),)
PARAMS = SamplingParams(max_tokens=16, temperature=0.0, top_p=1.0)


@pytest.fixture
async def alpha() -> AsyncIterator[MockUpstream]:
    upstream = MockUpstream("alpha")
    await upstream.start()
    try:
        yield upstream
    finally:
        await upstream.stop()


def model(upstream_model: str) -> CatalogModel:
    return CatalogModel(
        id="cloud-m",
        description="cloud-m",
        context_length=8192,
        tier="cloud",
        pricing=Pricing(input_per_1m_micros=1, output_per_1m_micros=1),
        upstreams=(UpstreamModel(upstream="alpha", model=upstream_model),),
    )


async def no_vault_key(_upstream: str) -> None:
    return None


async def answer(upstreams: Upstreams, upstream_model: str) -> list[Delta | Done]:
    run = CloudRun(model(upstream_model), streamed=True)
    events = [
        event async for event in upstreams.stream(run, MESSAGES, PARAMS, no_vault_key, "chatcmpl-t")
    ]
    assert run.upstream == "alpha" and run.attempts[-1].outcome == "succeeded"
    return events


async def test_chunks_that_arrive_together_are_one_delta(alpha: MockUpstream) -> None:
    upstreams = Upstreams(
        [UpstreamConfig(name="alpha", base_url=alpha.base_url, api_key=GOOD_KEY)],
        allow_private_urls=True,
    )
    try:
        for _ in range(2):
            *deltas, done = await answer(upstreams, "burst")
            assert deltas == [
                Delta(type="delta", job_id="chatcmpl-t", text="alpha says: hello there", tokens=4)
            ]
            assert isinstance(done, Done)
            assert done.finish_reason == "stop"
            assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (11, 4)
    finally:
        await upstreams.aclose()
    assert [r["stream"] for r in alpha.requests] == [True, True]


async def test_a_stream_in_any_pieces_gives_the_same_text_and_usage(alpha: MockUpstream) -> None:
    upstreams = Upstreams(
        [UpstreamConfig(name="alpha", base_url=alpha.base_url, api_key=GOOD_KEY)],
        allow_private_urls=True,
    )
    try:
        *deltas, done = await answer(upstreams, "fine")
        no_usage = await answer(upstreams, "no-usage-burst")
    finally:
        await upstreams.aclose()
    assert all(isinstance(delta, Delta) for delta in deltas)
    assert "".join(d.text for d in deltas if isinstance(d, Delta)) == "alpha says: hello there"
    assert sum(d.tokens for d in deltas if isinstance(d, Delta)) == 4
    assert isinstance(done, Done) and done.usage.completion_tokens == 4
    # Without usage from the upstream, the gateway counts the text itself.
    last = no_usage[-1]
    assert isinstance(last, Done) and last.usage.completion_tokens > 0
