"""The ``sim`` backend: a simulated device, shipped so demos, load tests and fault tests
all drive the same fake.

The text is derived from the prompt (same prompt and model, same answer), paced by
a time to first token and a token rate, and faults are injected on request: a fail
rate, an error or a dropped connection after N tokens, or a hang. A "liar" (``serve_as``)
claims one model and answers as another, for testing canaries.

A continuation (``continue_final``) gets the answer an honest sim device gives to the
conversation without the partial text, minus the words already given, so two devices
that split an answer produce exactly what one would have.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass

from swarmgate.catalog import Catalog
from swarmgate.node.backends.base import (
    BackendError,
    DropConnection,
    Finished,
    GenerationEvent,
    GenerationRequest,
    TokenDelta,
)
from swarmgate.protocol import LoadedModel

_WORDS = [
    "the",
    "network",
    "answers",
    "every",
    "request",
    "with",
    "care",
    "and",
    "the",
    "devices",
    "share",
    "the",
    "work",
    "while",
    "small",
    "models",
    "run",
    "on",
    "phones",
    "laptops",
    "and",
    "boxes",
    "people",
    "own",
    "so",
    "tokens",
    "flow",
    "back",
    "through",
    "one",
    "gateway",
    "that",
    "keeps",
    "the",
    "books",
    "and",
    "routes",
    "each",
    "job",
    "to",
    "a",
    "device",
    "that",
    "can",
    "serve",
    "it",
]


@dataclass(frozen=True)
class SimConfig:
    ttft_ms: float = 0.0
    tokens_per_s: float = 0.0  # 0 means as fast as possible
    length: int = 24  # tokens in a full answer, before max_tokens
    fail_rate: float = 0.0  # chance a job fails at once with an error frame
    error_after_tokens: int | None = None  # error frame after N tokens
    die_after_tokens: int | None = None  # drop the whole connection after N tokens
    hang: bool = False  # accept jobs and never answer
    rng_seed: int | None = None
    serve_as: str | None = None  # answer as this model while claiming the requested one
    # Tokens the simulated context holds, reported to the gateway. A prompt (counted by
    # ``estimate_prompt_tokens``) whose max_tokens would not fit after it fails with
    # CONTEXT_LENGTH_EXCEEDED: stricter than llama.cpp, which shortens the answer.
    # None: unlimited.
    context_length: int | None = None


def sim_answer(model: str, prompt_key: str, seed: int | None, n_tokens: int) -> list[str]:
    """The deterministic answer a sim device gives: one word per token."""
    digest = hashlib.sha256(f"{model}\x00{seed}\x00{prompt_key}".encode()).digest()
    rng = random.Random(digest)
    return [(" " if i else "") + rng.choice(_WORDS) for i in range(n_tokens)]


def _words_given(full: list[str], partial: str) -> int:
    """How many words of ``full`` the partial text holds: the longest prefix that spells
    it, else its word count."""
    text = ""
    for index, word in enumerate(full):
        if text == partial:
            return index
        text += word
    return len(full) if text == partial else min(len(full), len(partial.split()))


def estimate_prompt_tokens(texts: list[str]) -> int:
    return 3 + sum(len(text.split()) + 4 for text in texts)


class SimBackend:
    name = "sim"

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self._rng = random.Random(self.config.rng_seed)
        self._models: list[str] = []

    async def load(self, model_ids: list[str]) -> list[LoadedModel]:
        # A simulated device claims the catalog's artifact, as an honest device holding it would.
        catalog = Catalog.load()
        self._models = list(model_ids)
        loaded = []
        for model_id in model_ids:
            entry = catalog.get(model_id)
            sha256 = entry.artifact.sha256 if entry and entry.artifact else None
            loaded.append(
                LoadedModel(id=model_id, sha256=sha256, context_length=self.config.context_length)
            )
        return loaded

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        cfg = self.config
        if request.model not in self._models:
            raise BackendError(f"model {request.model!r} is not loaded", code="MODEL_NOT_LOADED")
        if cfg.hang:
            await asyncio.Event().wait()
        if cfg.fail_rate and self._rng.random() < cfg.fail_rate:
            raise BackendError("simulated failure", code="SIM_FAILURE")
        if cfg.ttft_ms:
            await asyncio.sleep(cfg.ttft_ms / 1000)

        messages = list(request.messages)
        partial = ""
        if request.continue_final and messages and messages[-1].role == "assistant":
            partial = messages.pop().content
        contents = [m.content for m in messages]
        if cfg.context_length is not None:
            needed = estimate_prompt_tokens(contents) + request.params.max_tokens
            if needed > cfg.context_length:
                raise BackendError(
                    f"the prompt and max_tokens need {needed} tokens; the context holds "
                    f"{cfg.context_length}",
                    code="CONTEXT_LENGTH_EXCEEDED",
                )
        model = cfg.serve_as or request.model
        full = sim_answer(model, "\x01".join(contents), request.params.seed, cfg.length)
        skip = _words_given(full, partial) if partial else 0
        left = len(full) - skip
        n_tokens = min(left, request.params.max_tokens)
        words = full[skip : skip + n_tokens]  # past the first, each word has its space
        finish_reason: str = "length" if request.params.max_tokens < left else "stop"
        gap = 1.0 / cfg.tokens_per_s if cfg.tokens_per_s else 0.0

        produced = 0
        for word in words:
            if cfg.die_after_tokens is not None and produced >= cfg.die_after_tokens:
                raise DropConnection("simulated device death")
            if cfg.error_after_tokens is not None and produced >= cfg.error_after_tokens:
                raise BackendError("simulated failure mid-answer", code="SIM_FAILURE")
            if gap and produced:
                await asyncio.sleep(gap)
            produced += 1
            yield TokenDelta(word)
        if cfg.die_after_tokens is not None and produced >= cfg.die_after_tokens:
            raise DropConnection("simulated device death")
        yield Finished(
            finish_reason="length" if finish_reason == "length" else "stop",
            prompt_tokens=estimate_prompt_tokens(contents) + (skip if partial else 0),
            completion_tokens=produced,
        )

    async def close(self) -> None:
        return None
