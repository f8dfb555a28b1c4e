"""Known-answer canaries: jobs whose answer the gateway already knows.

Now and then (``canary_interval_s``) each idle device gets one job from a fixed set of
prompts, greedy and with a fixed seed, that looks like any other job. Its answer is
compared with the reference for the model it claims to serve:

* llama.cpp is not bit-identical across machines, thread counts and batch sizes, so
  answers are compared with a tolerance, never as exact strings: the word-level
  similarity (1 - word edit distance / length) over the first ``L`` words, where
  ``L`` is the reference's length, or the answer's if shorter but at least
  ``MIN_COMPARED_WORDS`` — an honest device that stops a little early still matches,
  one that says almost nothing does not. At or above ``PASS_SIMILARITY`` it passes.
* References for ``llama-cpp`` devices ship in ``canaries.json`` (made with
  ``scripts/make_canary_references.py`` from the real model). Where builds for
  different processors (AVX-512, AVX2, ...) give different greedy answers to a prompt,
  each is kept as an accepted alternative and an answer is scored against the closest
  one. ``sim`` devices get the simulated answer their honest version would give. A
  device whose engine has no reference for a model gets no canary for it.

A failed canary is a suspicion (``trust/score.py``); three suspend the device. A canary
that errors or times out counts as an ordinary failed job, not as a wrong answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import orjson

from swarmgate.errors import SwarmgateError
from swarmgate.node.backends.sim import sim_answer
from swarmgate.protocol import ChatMessage, SamplingParams
from swarmgate.routing.choice import Route
from swarmgate.routing.dispatch import Execution, JobSpec
from swarmgate.routing.registry import DeviceConnection, DeviceRegistry
from swarmgate.trust.book import TrustBook

log = logging.getLogger("swarmgate.canary")

PASS_SIMILARITY = 0.5
MIN_COMPARED_WORDS = 8


@dataclass(frozen=True, slots=True)
class CanarySet:
    prompts: tuple[str, ...]
    max_tokens: int
    seed: int
    # model → engine → per prompt, the accepted reference answers
    references: dict[str, dict[str, tuple[tuple[str, ...], ...]]]

    @classmethod
    def load(cls, path: Path | None = None) -> CanarySet:
        if path is None:
            raw = resources.files("swarmgate").joinpath("canaries.json").read_bytes()
        else:
            raw = path.read_bytes()
        data = orjson.loads(raw)
        return cls(
            prompts=tuple(data["prompts"]),
            max_tokens=int(data["max_tokens"]),
            seed=int(data["seed"]),
            references={
                model: {
                    engine: tuple(_alternatives(answer) for answer in answers)
                    for engine, answers in engines.items()
                }
                for model, engines in data["references"].items()
            },
        )

    def reference(self, model: str, engine: str, index: int) -> tuple[str, ...] | None:
        """The accepted answers to prompt ``index`` (None: no reference for this engine)."""
        if engine == "sim":
            prompt = self.prompts[index]
            return ("".join(sim_answer(model, prompt, self.seed, self.max_tokens)),)
        answers = self.references.get(model, {}).get(engine)
        if answers is None or index >= len(answers):
            return None
        return answers[index]

    def covers(self, model: str, engine: str) -> bool:
        return engine == "sim" or engine in self.references.get(model, {})


def _alternatives(answer: str | list[str]) -> tuple[str, ...]:
    return (answer,) if isinstance(answer, str) else tuple(answer)


def _edit_distance(a: Sequence[str], b: Sequence[str]) -> int:
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def similarity(reference: str, answer: str) -> float:
    """Word-level similarity in [0, 1] over the compared prefix (see the module doc)."""
    expected = reference.split()
    got = answer.split()
    if not expected:
        return 1.0 if not got else 0.0
    length = min(len(expected), max(len(got), MIN_COMPARED_WORDS))
    expected, got = expected[:length], got[:length]
    return 1.0 - _edit_distance(expected, got) / max(len(expected), len(got))


@dataclass(frozen=True, slots=True)
class CanaryOutcome:
    device_id: str
    model: str
    similarity: float | None  # None: the job failed, so nothing was compared

    @property
    def passed(self) -> bool | None:
        return None if self.similarity is None else self.similarity >= PASS_SIMILARITY


class CanaryRunner:
    def __init__(
        self,
        registry: DeviceRegistry,
        trust: TrustBook,
        new_execution: Callable[[JobSpec], Execution],
        canaries: CanarySet,
        *,
        interval_s: float,
        max_per_round: int = 50,
        rng: random.Random | None = None,
    ) -> None:
        self._registry = registry
        self._trust = trust
        self._new_execution = new_execution
        self.canaries = canaries
        self._interval_s = interval_s
        self._max_per_round = max_per_round
        self._rng = rng or random.Random()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._interval_s > 0:
            self._task = asyncio.create_task(self._loop(), name="canaries")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            # Jittered, so rounds do not line up with anything a device could watch for.
            await asyncio.sleep(self._interval_s * self._rng.uniform(0.5, 1.5))
            try:
                await self.run_round()
            except Exception:
                log.exception("a canary round failed")

    def _targets(self) -> list[tuple[DeviceConnection, str]]:
        targets: list[tuple[DeviceConnection, str]] = []
        devices = self._registry.devices()
        self._rng.shuffle(devices)
        for device in devices:
            if not device.local or not device.accepting or device.active:
                # Never take a slot a paying job could use; a device on another gateway
                # gets its canaries from that gateway.
                continue
            models = [m for m in device.models if self.canaries.covers(m, device.profile.engine)]
            if models:
                targets.append((device, self._rng.choice(sorted(models))))
            if len(targets) >= self._max_per_round:
                break
        return targets

    async def run_round(self) -> list[CanaryOutcome]:
        targets = self._targets()
        return list(await asyncio.gather(*(self.probe(d, m) for d, m in targets)))

    async def probe(self, device: DeviceConnection, model: str) -> CanaryOutcome:
        """Sends one canary to ``device`` and scores its answer."""
        index = self._rng.randrange(len(self.canaries.prompts))
        reference = self.canaries.reference(model, device.profile.engine, index)
        if reference is None:
            return CanaryOutcome(device.device_id, model, None)
        spec = JobSpec(
            job_id=f"chatcmpl-{secrets.token_hex(12)}",  # like any other job
            account_id="",
            key_id=None,
            kind="chat",
            model=model,
            messages=(ChatMessage(role="user", content=self.canaries.prompts[index]),),
            params=SamplingParams(
                max_tokens=self.canaries.max_tokens,
                temperature=0.0,
                top_p=1.0,
                seed=self.canaries.seed,
            ),
            stream=False,
            route=Route(
                models=(model,),
                allow=frozenset({device.device_id}),
                max_tokens=self.canaries.max_tokens,
            ),
            continuation=False,
            internal=True,
        )
        try:
            completion = await self._new_execution(spec).complete()
        except SwarmgateError:
            return CanaryOutcome(device.device_id, model, None)
        score = max(similarity(accepted, completion.text) for accepted in reference)
        outcome = CanaryOutcome(device.device_id, model, score)
        self._trust.canary_result(device.profile, bool(outcome.passed))
        log.info(
            "canary",
            extra={
                "device_id": device.device_id,
                "model": model,
                "similarity": round(score, 3),
                "passed": outcome.passed,
            },
        )
        return outcome
