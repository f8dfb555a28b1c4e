"""Continuing a partial assistant turn on the node (sim and real llama.cpp), the sim liar,
and the job frame's rules for it."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from swarmgate.node.backends.base import Finished, GenerationRequest, TokenDelta
from swarmgate.node.backends.sim import SimBackend, SimConfig, sim_answer
from swarmgate.protocol import ChatMessage, JobFrame, SamplingParams

MODEL = "smollm2-135m-instruct-q4_1"
USER = ChatMessage(role="user", content="tell me something")


def request(
    messages: list[ChatMessage], max_tokens: int = 64, continue_final: bool = False
) -> GenerationRequest:
    return GenerationRequest(
        job_id="j",
        model=MODEL,
        messages=messages,
        params=SamplingParams(max_tokens=max_tokens, temperature=0, top_p=1, seed=5),
        continue_final=continue_final,
    )


async def run(backend: object, req: GenerationRequest) -> tuple[str, Finished]:
    parts: list[str] = []
    async for event in backend.generate(req):  # type: ignore[attr-defined]
        if isinstance(event, TokenDelta):
            parts.append(event.text)
        else:
            assert isinstance(event, Finished)
            return "".join(parts), event
    raise AssertionError("no Finished")


@pytest.mark.parametrize("given", [0, 1, 5, 11, 23, 24])
async def test_sim_continues_exactly_where_the_partial_answer_stopped(given: int) -> None:
    backend = SimBackend(SimConfig(length=24))
    await backend.load([MODEL])
    whole, done = await run(backend, request([USER]))
    words = sim_answer(MODEL, USER.content, 5, 24)
    assert whole == "".join(words) and done.completion_tokens == 24
    partial = "".join(words[:given])
    rest, finished = await run(
        backend,
        request([USER, ChatMessage(role="assistant", content=partial)], continue_final=True),
    )
    assert partial + rest == whole
    assert finished.completion_tokens == 24 - given  # only the new tokens count
    assert finished.finish_reason == "stop"


async def test_a_continuations_max_tokens_counts_only_new_tokens() -> None:
    backend = SimBackend(SimConfig(length=24))
    await backend.load([MODEL])
    partial = "".join(sim_answer(MODEL, USER.content, 5, 10))
    rest, finished = await run(
        backend,
        request(
            [USER, ChatMessage(role="assistant", content=partial)],
            max_tokens=4,
            continue_final=True,
        ),
    )
    assert finished.completion_tokens == 4 and finished.finish_reason == "length"
    assert rest == "".join(sim_answer(MODEL, USER.content, 5, 14)[10:])


async def test_a_liar_claims_the_model_but_answers_as_another() -> None:
    honest, liar = SimBackend(), SimBackend(SimConfig(serve_as="liar/other-model"))
    announced = [await honest.load([MODEL]), await liar.load([MODEL])]
    assert announced[0] == announced[1]  # same id, same artifact digest
    said = [(await run(b, request([USER])))[0] for b in (honest, liar)]
    assert said[0] != said[1]
    assert said[1] == "".join(sim_answer("liar/other-model", USER.content, 5, 24))


def test_continue_final_needs_a_last_assistant_message() -> None:
    frame = {
        "type": "job",
        "job_id": "j",
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "params": {"max_tokens": 5, "temperature": 0, "top_p": 1},
        "stream": True,
        "continue_final": True,
    }
    with pytest.raises(ValidationError, match="continue_final"):
        JobFrame.model_validate(frame)
    frame["messages"].append({"role": "assistant", "content": "Hel"})  # type: ignore[attr-defined]
    assert JobFrame.model_validate(frame).continue_final
    del frame["continue_final"]
    assert JobFrame.model_validate(frame).continue_final is False  # older gateways


@pytest.mark.llama
async def test_llama_cpp_continues_a_partial_answer_without_repeating_it() -> None:
    pytest.importorskip("llama_cpp")
    from swarmgate.node.backends.llama_cpp import LlamaCppBackend

    backend = LlamaCppBackend(n_ctx=512, n_threads=2)
    await backend.load([MODEL])
    try:
        question = ChatMessage(role="user", content="Name the four seasons of the year.")
        deltas: list[str] = []
        async for event in backend.generate(request([question], max_tokens=32)):
            if isinstance(event, TokenDelta):
                deltas.append(event.text)
            else:
                assert isinstance(event, Finished)
                done = event
        whole = "".join(deltas)
        assert done.completion_tokens > 8
        # What a dying device had streamed: whole tokens, as the gateway relays them.
        partial = "".join(deltas[: len(deltas) // 2])
        rest, finished = await run(
            backend,
            request(
                [question, ChatMessage(role="assistant", content=partial)],
                max_tokens=32,
                continue_final=True,
            ),
        )
        joined = partial + rest
        assert not rest.startswith(partial.strip()[:10])  # no new turn, no repetition
        # The prompt holds the partial text too.
        assert finished.prompt_tokens > done.prompt_tokens
        # Greedy on the same machine: the spliced answer mostly agrees with the whole one
        # (one batch versus token by token may still tip a near tie later on).
        agree = next(
            (i for i, (a, b) in enumerate(zip(joined, whole, strict=False)) if a != b),
            min(len(joined), len(whole)),
        )
        assert agree >= len(partial) + 1, (joined, whole)
    finally:
        await backend.close()
