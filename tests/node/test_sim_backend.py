"""The shipped fake: deterministic answers, pacing and injected faults."""

from __future__ import annotations

import asyncio
import time

import pytest

from swarmgate.node.backends.base import (
    BackendError,
    DropConnection,
    Finished,
    GenerationRequest,
    TokenDelta,
    create_backend,
)
from swarmgate.node.backends.sim import SimBackend, SimConfig
from swarmgate.protocol import ChatMessage, SamplingParams

MODEL = "smollm2-135m-instruct-q4_1"


def request(
    text: str = "hello", max_tokens: int = 256, seed: int | None = None
) -> GenerationRequest:
    return GenerationRequest(
        job_id="j",
        model=MODEL,
        messages=[ChatMessage(role="user", content=text)],
        params=SamplingParams(max_tokens=max_tokens, temperature=0.7, top_p=0.9, seed=seed),
    )


async def run(backend: SimBackend, req: GenerationRequest) -> tuple[str, Finished]:
    text = ""
    async for event in backend.generate(req):
        if isinstance(event, TokenDelta):
            text += event.text
        else:
            return text, event
    raise AssertionError("no Finished event")


async def loaded(**config: object) -> SimBackend:
    backend = SimBackend(SimConfig(**config))  # type: ignore[arg-type]
    models = await backend.load([MODEL])
    assert models[0].sha256 is not None  # claims the catalog artifact
    return backend


async def test_same_prompt_same_answer_and_prompt_changes_it() -> None:
    backend = await loaded(length=10)
    first, done = await run(backend, request("a"))
    again, _ = await run(backend, request("a"))
    other, _ = await run(backend, request("b"))
    assert first == again != other
    assert done.completion_tokens == 10 and done.finish_reason == "stop"
    assert done.prompt_tokens > 0


@pytest.mark.parametrize(
    ("max_tokens", "tokens", "reason"), [(3, 3, "length"), (10, 10, "stop"), (50, 10, "stop")]
)
async def test_max_tokens_and_finish_reason(max_tokens: int, tokens: int, reason: str) -> None:
    backend = await loaded(length=10)
    _, done = await run(backend, request(max_tokens=max_tokens))
    assert (done.completion_tokens, done.finish_reason) == (tokens, reason)


async def test_faults() -> None:
    with pytest.raises(DropConnection):
        await run(await loaded(die_after_tokens=2), request())
    with pytest.raises(BackendError):
        await run(await loaded(error_after_tokens=2), request())
    with pytest.raises(BackendError):
        await run(await loaded(fail_rate=1.0), request())
    hanging = await loaded(hang=True)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(run(hanging, request()), 0.1)


async def test_pacing() -> None:
    backend = await loaded(ttft_ms=100, tokens_per_s=100, length=6)
    started = time.monotonic()
    await run(backend, request())
    assert time.monotonic() - started >= 0.1 + 5 * 0.01 - 0.005


async def test_unknown_model_and_registry() -> None:
    backend = create_backend("sim", length=2)
    await backend.load(["other"])
    with pytest.raises(BackendError):
        await run(backend, request())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown backend"):
        create_backend("nope")
