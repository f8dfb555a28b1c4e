"""Pure decisions of orchestration: which workflow ``auto`` runs, how a long input is cut
into chunks, how partial results are reduced, what a budget still allows, what a run
may cost. Tested with tables (tests/workflows/test_plan.py)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from swarmgate.billing.pricing import max_cost_micros
from swarmgate.catalog import Pricing
from swarmgate.memory.tokens import MESSAGE_OVERHEAD, PROMPT_OVERHEAD
from swarmgate.workflows.registry import Workflow

_CODE = re.compile(
    r"```|\b(code|function|class|implement|refactor|bug|debug|compile|script|python|"
    r"javascript|typescript|rust|java|golang|sql|regex|api endpoint)\b",
    re.I,
)
_TOOLISH = re.compile(
    r"\b(calculate|compute|what time|current time|today's date|how much is|convert)\b"
    r"|\d+\s*[-+*/^%]\s*\d+",
    re.I,
)
# Inputs longer than this share of the window go to map_reduce.
LONG_INPUT_SHARE = 0.5


def choose_workflow(
    task: str, *, has_tools: bool, task_tokens: int, window: int
) -> tuple[str, str]:
    """``auto``: (workflow, why), by these rules, first match wins:

    1. the request brings tools, or asks for arithmetic or the time → ``agent``;
    2. the input takes more than half of the model's window → ``map_reduce``;
    3. it mentions code (a fence, a language, "implement", "bug", ...) → ``code``;
    4. anything else → ``research``.
    """
    if has_tools:
        return "agent", "the request brings tools"
    if task_tokens > window * LONG_INPUT_SHARE:
        return "map_reduce", "the input is longer than half of the model's context"
    if _TOOLISH.search(task):
        return "agent", "the task asks for a calculation or the time"
    if _CODE.search(task):
        return "code", "the task is about code"
    return "research", "no other rule matched"


def split_chunks(text: str, count: Callable[[str], int], chunk_tokens: int) -> list[str]:
    """``text`` cut into chunks of at most ``chunk_tokens`` (as ``count`` counts them),
    at paragraph breaks where possible, else sentences, else words, else characters."""
    chunk_tokens = max(1, chunk_tokens)
    pieces = _pieces(text, count, chunk_tokens)
    chunks: list[str] = []
    current: list[str] = []
    used = 0
    for piece, tokens in pieces:
        if current and used + tokens > chunk_tokens:
            chunks.append("".join(current).strip())
            current, used = [], 0
        current.append(piece)
        used += tokens
    if current:
        chunks.append("".join(current).strip())
    return [c for c in chunks if c]


def _pieces(text: str, count: Callable[[str], int], limit: int) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for paragraph in re.split(r"(?<=\n\n)", text):
        tokens = count(paragraph)
        if tokens <= limit:
            out.append((paragraph, tokens))
            continue
        for sentence in re.split(r"(?<=[.!?])\s+", paragraph):
            sentence += " "
            tokens = count(sentence)
            if tokens <= limit:
                out.append((sentence, tokens))
                continue
            for word in re.split(r"(?<=\s)", sentence):
                tokens = count(word)
                if tokens <= limit:
                    out.append((word, tokens))
                    continue
                step = max(1, len(word) * limit // (tokens + 1))
                out.extend(
                    (word[i : i + step], count(word[i : i + step]))
                    for i in range(0, len(word), step)
                )
    return out


def reduce_groups(tokens: Sequence[int], room: int) -> list[list[int]]:
    """Indexes of partial results grouped so that each group fits ``room`` tokens (at
    least two per group when there are several, so every round shrinks the pile)."""
    groups: list[list[int]] = []
    current: list[int] = []
    used = 0
    for index, n in enumerate(tokens):
        if len(current) >= 2 and used + n > room:
            groups.append(current)
            current, used = [], 0
        current.append(index)
        used += n
    if current:
        groups.append(current)
    return groups


def reduce_steps(parts: int, per_group: int) -> int:
    """How many reduce jobs ``parts`` partial results need, ``per_group`` per job (a
    lone leftover part waits for the next round instead of a job of its own)."""
    per_group = max(2, per_group)
    steps = 0
    while parts > 1:
        jobs, left = divmod(parts, per_group)
        if left >= 2:
            jobs, left = jobs + 1, 0
        steps += jobs
        parts = jobs + left
    return max(1, steps)


def prompt_tokens(messages: Sequence[tuple[str, str]], count: Callable[[str], int]) -> int:
    return PROMPT_OVERHEAD + sum(count(text) + MESSAGE_OVERHEAD for _, text in messages)


@dataclass(slots=True)
class Budget:
    """What a run may still spend: steps and integer micro-dollars."""

    max_steps: int
    max_cost_micros: int | None
    steps: int = 0
    spent_micros: int = 0

    def stop_reason(self, next_step_max_micros: int, steps: int = 1) -> str | None:
        """Why the next ``steps`` step(s) must not start (None: they may)."""
        if self.steps + steps > self.max_steps:
            return "max_steps"
        limit = self.max_cost_micros
        if limit is not None and self.spent_micros + next_step_max_micros > limit:
            return "max_cost"
        return None

    def record(self, cost_micros: int) -> None:
        self.steps += 1
        self.spent_micros += cost_micros


@dataclass(frozen=True, slots=True)
class Estimate:
    steps_min: int
    steps_max: int
    cost_min_micros: int
    cost_max_micros: int


def estimate(
    workflow: Workflow,
    *,
    input_tokens: int,
    pricing: Pricing,
    window: int,
    max_steps: int,
    chunk_tokens: int,
) -> Estimate:
    """A cost range before running: the least assumes every step answers briefly (a
    tenth of its token allowance) and an agent answers at once; the most assumes every
    step uses its whole allowance and an agent runs to ``max_steps``. Each step's
    prompt carries the task and earlier outputs, as the run would."""

    def cost(prompt: int, answer: int) -> int:
        return max_cost_micros(pricing, min(prompt, window), answer)

    if workflow.kind == "chain":
        low = high = 0
        low_out = high_out = 0
        for template in workflow.steps[:max_steps]:
            base = input_tokens + PROMPT_OVERHEAD + 3 * MESSAGE_OVERHEAD + 60
            low += cost(base + low_out, max(1, template.max_tokens // 10))
            high += cost(base + high_out, template.max_tokens)
            low_out += max(1, template.max_tokens // 10)
            high_out += template.max_tokens
        steps = min(len(workflow.steps), max_steps)
        return Estimate(steps, steps, low, high)
    if workflow.kind == "agent":
        per_step = 384
        base = input_tokens + PROMPT_OVERHEAD + 2 * MESSAGE_OVERHEAD + 300
        low = cost(base, per_step // 10)
        high = sum(cost(base + i * (per_step + 200), per_step) for i in range(max_steps))
        return Estimate(1, max_steps, low, high)
    mapper, reducer = workflow.steps
    chunks = max(1, -(-input_tokens // max(1, chunk_tokens)))
    reduces = reduce_steps(chunks, max(2, (window // 2) // max(1, mapper.max_tokens)))
    total = min(chunks + reduces, max_steps)
    maps = min(chunks, max(0, total - 1)) if chunks > 1 else min(chunks, total)
    per_chunk = min(chunk_tokens, input_tokens) + PROMPT_OVERHEAD + 2 * MESSAGE_OVERHEAD + 60
    low = maps * cost(per_chunk, max(1, mapper.max_tokens // 10))
    high = maps * cost(per_chunk, mapper.max_tokens)
    notes = PROMPT_OVERHEAD + 60 + min(window // 2, chunks * mapper.max_tokens)
    low += cost(notes, max(1, reducer.max_tokens // 10))
    high += (total - maps) * cost(notes, reducer.max_tokens)
    return Estimate(min(total, 2 if chunks > 1 else total), total, low, high)
