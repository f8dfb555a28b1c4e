"""Orchestration's pure decisions: auto's choice, chunks, reduce groups, budgets, estimates."""

from __future__ import annotations

import pytest

from swarmgate.catalog import Pricing
from swarmgate.memory.tokens import estimate_tokens
from swarmgate.workflows import plan, registry

PRICING = Pricing(input_per_1m_micros=1_000_000, output_per_1m_micros=2_000_000)


@pytest.mark.parametrize(
    ("task", "tools", "tokens", "chosen"),
    [
        ("What is 17 * 23?", False, 10, "agent"),
        ("Calculate the compound interest on $1000", False, 10, "agent"),
        ("What time is it in Tokyo?", False, 10, "agent"),
        ("Summarise this", True, 10, "agent"),  # the request brings tools
        ("Summarise this report", False, 5000, "map_reduce"),  # over half of 8192
        ("Write a Python function that reverses a list", False, 10, "code"),
        ("Fix the bug in this:\n```js\nx = 1\n```", False, 10, "code"),
        ("Research renewable energy trends", False, 10, "research"),
        ("Tell me about otters", False, 10, "research"),
    ],
)
def test_auto_chooses_by_documented_rules(task: str, tools: bool, tokens: int, chosen: str) -> None:
    name, why = plan.choose_workflow(task, has_tools=tools, task_tokens=tokens, window=8192)
    assert name == chosen and why
    assert registry.get(name) is not None


@pytest.mark.parametrize("limit", [16, 50, 200])
def test_chunks_fit_and_keep_all_the_text(limit: int) -> None:
    paragraphs = [
        " ".join(f"Sentence {p}.{s} has some words in it." for s in range(6)) for p in range(12)
    ]
    text = "\n\n".join(paragraphs) + "\n\n" + "x" * 900  # one word longer than any chunk
    chunks = plan.split_chunks(text, estimate_tokens, limit)
    assert len(chunks) > 1
    assert all(estimate_tokens(c) <= limit + 2 for c in chunks)
    assert "".join("".join(c.split()) for c in chunks) == "".join(text.split())


def test_a_short_text_is_one_chunk() -> None:
    assert plan.split_chunks("Just this.", estimate_tokens, 100) == ["Just this."]
    assert plan.split_chunks("   ", estimate_tokens, 100) == []


@pytest.mark.parametrize(
    ("tokens", "room", "groups"),
    [
        ([10, 10, 10], 100, [[0, 1, 2]]),
        ([60, 60, 60, 60], 100, [[0, 1], [2, 3]]),  # at least two per group
        ([10] * 5, 25, [[0, 1], [2, 3], [4]]),
        ([500], 100, [[0]]),
    ],
)
def test_reduce_groups(tokens: list[int], room: int, groups: list[list[int]]) -> None:
    assert plan.reduce_groups(tokens, room) == groups


@pytest.mark.parametrize(
    ("parts", "per_group", "steps"),
    [(1, 4, 1), (2, 4, 1), (4, 4, 1), (5, 4, 2), (6, 4, 3), (16, 4, 5), (9, 2, 8)],
)
def test_reduce_steps(parts: int, per_group: int, steps: int) -> None:
    assert plan.reduce_steps(parts, per_group) == steps


def test_budget_stops_before_a_step_would_pass_it() -> None:
    budget = plan.Budget(max_steps=3, max_cost_micros=1_000)
    assert budget.stop_reason(400) is None
    budget.record(400)
    assert budget.stop_reason(600) is None  # exactly at the cap is allowed
    assert budget.stop_reason(601) == "max_cost"
    budget.record(100)
    budget.record(100)
    assert budget.stop_reason(0) == "max_steps"
    unlimited = plan.Budget(max_steps=2, max_cost_micros=None)
    assert unlimited.stop_reason(10**12) is None
    assert unlimited.stop_reason(0, steps=3) == "max_steps"


@pytest.mark.parametrize("name", ["research", "code", "agent", "map_reduce"])
def test_estimates_are_ranges_that_grow_with_the_input(name: str) -> None:
    workflow = registry.get(name)
    assert workflow is not None
    small = plan.estimate(
        workflow, input_tokens=100, pricing=PRICING, window=8192, max_steps=10, chunk_tokens=3000
    )
    large = plan.estimate(
        workflow, input_tokens=20_000, pricing=PRICING, window=8192, max_steps=10, chunk_tokens=3000
    )
    assert 0 < small.cost_min_micros <= small.cost_max_micros
    assert small.cost_max_micros <= large.cost_max_micros
    assert 1 <= small.steps_min <= small.steps_max <= 10
    if name in ("research", "code"):
        assert small.steps_min == small.steps_max == 3
    if name == "map_reduce":
        assert large.steps_max == 7 + plan.reduce_steps(7, 14) or large.steps_max == 10


def test_estimates_respect_max_steps() -> None:
    research = registry.get("research")
    assert research is not None
    two = plan.estimate(
        research, input_tokens=100, pricing=PRICING, window=8192, max_steps=2, chunk_tokens=3000
    )
    three = plan.estimate(
        research, input_tokens=100, pricing=PRICING, window=8192, max_steps=10, chunk_tokens=3000
    )
    assert two.steps_max == 2 and two.cost_max_micros < three.cost_max_micros


def test_the_registry_takes_new_workflows_as_data() -> None:
    review = registry.Workflow(
        name="test-review",
        kind="chain",
        description="draft → critique",
        steps=(
            registry.StepTemplate("draft", "Draft.", "Task: {task}"),
            registry.StepTemplate("critique", "Critique.", "Draft:\n{draft}"),
        ),
    )
    try:
        registry.register(review)
        assert "test-review" in registry.names()
        with pytest.raises(ValueError):
            registry.register(review)
    finally:
        registry.REGISTRY.pop("test-review", None)
    with pytest.raises(ValueError):
        registry.register(registry.Workflow("auto", "chain", "x", review.steps))
    with pytest.raises(ValueError):
        registry.register(registry.Workflow("empty", "chain", "x"))
