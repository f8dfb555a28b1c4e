"""The workflow engine with a scripted step runner: step order, budgets, failures, the
agent's tools and the client's, map_reduce's parallel maps and reduce rounds."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from swarmgate.errors import DeviceFailed
from swarmgate.memory.tokens import estimate_tokens
from swarmgate.workflows import registry
from swarmgate.workflows.engine import (
    Engine,
    NothingRan,
    StepFailed,
    StepOutcome,
    StepRecord,
    StepRequest,
    fill,
)
from swarmgate.workflows.plan import Budget
from swarmgate.workflows.react import ToolSpec

Answer = Callable[[StepRequest], str]


class Scripted:
    """Answers each step with ``answer(request)``; every step costs ``cost`` micros."""

    def __init__(
        self,
        answer: Answer,
        *,
        cost: int = 100,
        window: int = 8192,
        fail: Callable[[StepRequest], bool] = lambda _r: False,
        delay: float = 0.0,
    ) -> None:
        self.answer = answer
        self.cost = cost
        self.window = window
        self.fail = fail
        self.delay = delay
        self.requests: list[StepRequest] = []
        self.running = 0
        self.most_at_once = 0

    def count(self, text: str) -> int:
        return estimate_tokens(text)

    def max_cost(self, request: StepRequest) -> int:
        return self.cost

    async def run(self, request: StepRequest) -> StepOutcome:
        self.requests.append(request)
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.fail(request):
                raise StepFailed(DeviceFailed("the device failed"), "job-x", 5)
            return StepOutcome(
                self.answer(request), "m", "dev_1", 10, 5, self.cost, 1, f"job-{len(self.requests)}"
            )
        finally:
            self.running -= 1


def workflow(name: str) -> registry.Workflow:
    found = registry.get(name)
    assert found is not None
    return found


def by_name(request: StepRequest) -> str:
    return f"<{request.name} output>"


async def test_research_runs_its_steps_in_order_each_seeing_the_earlier_ones() -> None:
    runner = Scripted(by_name)
    seen: list[StepRecord] = []

    async def on_step(record: StepRecord) -> None:
        seen.append(record)

    result = await Engine(runner, Budget(10, None), on_step=on_step).run(
        workflow("research"), "Research otters", context="user: hi"
    )
    assert [r.name for r in runner.requests] == ["research", "analyze", "write"]
    assert result.status == "completed" and result.answer == "<write output>"
    write = runner.requests[-1].messages[-1].content
    assert "<research output>" in write and "<analyze output>" in write
    assert "Research otters" in write and "Conversation so far:\nuser: hi" in write
    assert [s.name for s in seen] == ["research", "analyze", "write"]
    assert result.cost_micros == 300


async def test_code_is_plan_implement_review() -> None:
    runner = Scripted(by_name)
    result = await Engine(runner, Budget(10, None)).run(workflow("code"), "Reverse a list")
    assert [r.name for r in runner.requests] == ["plan", "implement", "review"]
    assert result.answer == "<review output>"


@pytest.mark.parametrize(
    ("budget", "ran", "reason"),
    [
        (Budget(max_steps=2, max_cost_micros=None), 2, "max_steps"),
        (Budget(max_steps=10, max_cost_micros=250), 2, "max_cost"),
        (Budget(max_steps=10, max_cost_micros=300), 3, None),
    ],
)
async def test_a_chain_stops_before_it_would_pass_its_budget(
    budget: Budget, ran: int, reason: str | None
) -> None:
    runner = Scripted(by_name)
    result = await Engine(runner, budget).run(workflow("research"), "task")
    assert len(runner.requests) == ran
    assert result.stop_reason == reason
    assert result.status == ("completed" if reason is None else "stopped")
    # What it has: the latest output.
    assert result.answer == f"<{runner.requests[-1].name} output>"
    assert result.cost_micros <= (budget.max_cost_micros or 10**9)


async def test_a_budget_that_allows_nothing_runs_nothing() -> None:
    runner = Scripted(by_name, cost=500)
    with pytest.raises(NothingRan) as caught:
        await Engine(runner, Budget(10, 100)).run(workflow("research"), "task")
    assert caught.value.reason == "max_cost" and runner.requests == []


async def test_a_failed_step_ends_the_run_with_what_it_has() -> None:
    runner = Scripted(by_name, fail=lambda r: r.name == "write")
    result = await Engine(runner, Budget(10, None)).run(workflow("research"), "task")
    assert result.status == "failed" and result.stop_reason == "step_failed"
    assert result.answer == "<analyze output>"
    assert [s.status for s in result.steps] == ["succeeded", "succeeded", "failed"]
    assert result.steps[-1].error_code == "DEVICE_FAILED" and result.cost_micros == 200
    # A first step that fails is the request's own error: nothing was charged.
    first = Scripted(by_name, fail=lambda r: True)
    with pytest.raises(DeviceFailed):
        await Engine(first, Budget(10, None)).run(workflow("research"), "task")


def agent_script(*replies: str) -> Answer:
    queue = list(replies)

    def answer(_request: StepRequest) -> str:
        return queue.pop(0)

    return answer


async def test_the_agent_uses_its_calculator_then_answers() -> None:
    runner = Scripted(
        agent_script(
            'Thought: I should multiply.\nAction: calculator\nAction Input: {"expression": "17 * 23"}',
            "Thought: I know it now.\nFinal Answer: 17 times 23 is 391.",
        )
    )
    result = await Engine(runner, Budget(10, None)).run(workflow("agent"), "What is 17 * 23?")
    assert result.status == "completed" and result.answer == "17 times 23 is 391."
    assert len(runner.requests) == 2
    second = "\n".join(m.content for m in runner.requests[1].messages)
    assert "391" in second  # the tool's observation went back to the model
    assert result.steps[0].tool == "calculator"


async def test_the_agent_reports_tool_errors_and_unknown_tools_as_observations() -> None:
    runner = Scripted(
        agent_script(
            'Thought: try\nAction: shell\nAction Input: {"cmd": "ls"}',
            'Thought: again\nAction: calculator\nAction Input: {"expression": "1/0"}',
            "Final Answer: cannot divide by zero",
        )
    )
    result = await Engine(runner, Budget(10, None)).run(workflow("agent"), "1/0?")
    transcript = "\n".join(m.content for m in runner.requests[2].messages)
    assert "unknown tool" in transcript and "error" in transcript
    assert result.answer == "cannot divide by zero"


async def test_the_agent_stops_at_max_steps() -> None:
    loop = "Thought: more\nAction: current_time\nAction Input: {}"
    runner = Scripted(lambda _r: loop)
    result = await Engine(runner, Budget(3, None)).run(workflow("agent"), "time?")
    assert len(runner.requests) == 3
    assert result.status == "stopped" and result.stop_reason == "max_steps"


async def test_the_agent_surfaces_the_clients_tools_as_tool_calls() -> None:
    weather = ToolSpec("get_weather", "The weather in a city", {"type": "object"})
    runner = Scripted(
        agent_script('Thought: ask the client\nAction: get_weather\nAction Input: {"city": "Oslo"}')
    )
    result = await Engine(runner, Budget(10, None)).run(
        workflow("agent"), "Weather in Oslo?", client_tools=[weather]
    )
    assert result.status == "tool_calls" and result.tool_calls is not None
    call = result.tool_calls[0]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert '"Oslo"' in call["function"]["arguments"]
    prompt = "\n".join(m.content for m in runner.requests[0].messages)
    assert "get_weather" in prompt and "calculator" in prompt


async def test_an_answer_without_the_format_is_taken_as_final() -> None:
    runner = Scripted(lambda _r: "Paris is the capital of France.")
    result = await Engine(runner, Budget(10, None)).run(workflow("agent"), "Capital of France?")
    assert result.answer == "Paris is the capital of France." and len(runner.requests) == 1


LONG = "\n\n".join(
    f"Paragraph {i}: " + "the quick brown fox jumps over the lazy dog " * 30 for i in range(40)
)


async def test_map_reduce_maps_chunks_in_parallel_then_reduces() -> None:
    runner = Scripted(by_name, window=2048, delay=0.02)
    result = await Engine(runner, Budget(100, None)).run(workflow("map_reduce"), LONG)
    maps = [r for r in runner.requests if r.name.startswith("map")]
    reduces = [r for r in runner.requests if r.name.startswith("reduce")]
    assert len(maps) > 4 and reduces[-1].name == "reduce (final)"
    assert runner.most_at_once >= len(maps) // 2  # the maps ran together
    assert result.status == "completed" and result.answer == "<reduce (final) output>"
    for request in maps:
        assert estimate_tokens(request.messages[-1].content) < 2048


async def test_map_reduce_reduces_in_rounds_when_notes_are_many() -> None:
    runner = Scripted(
        lambda r: "note " * 300 if r.name.startswith("map") else "merged", window=2048
    )
    result = await Engine(runner, Budget(100, None)).run(workflow("map_reduce"), LONG)
    rounds = [
        r.name for r in runner.requests if r.name.startswith("reduce ") and "final" not in r.name
    ]
    assert rounds, "many long notes need a reduce round before the final one"
    assert result.status == "completed"


async def test_map_reduce_keeps_a_step_for_the_final_reduce() -> None:
    runner = Scripted(by_name, window=2048)
    result = await Engine(runner, Budget(4, None)).run(workflow("map_reduce"), LONG)
    names = [r.name for r in runner.requests]
    assert len(names) == 4 and names[-1] == "reduce (final)"
    assert result.status == "stopped" and result.stop_reason == "max_steps"


async def test_map_reduce_survives_a_failed_map() -> None:
    runner = Scripted(by_name, window=2048, fail=lambda r: r.name.startswith("map 2/"))
    result = await Engine(runner, Budget(100, None)).run(workflow("map_reduce"), LONG)
    assert result.status == "failed" and result.answer == "<reduce (final) output>"


async def test_a_short_input_is_one_step() -> None:
    runner = Scripted(by_name)
    result = await Engine(runner, Budget(10, None)).run(workflow("map_reduce"), "short text")
    assert [r.name for r in runner.requests] == ["reduce"] and result.status == "completed"


def test_placeholders_are_filled_once() -> None:
    assert fill("Task: {task} {missing}", {"task": "say {task}"}) == "Task: say {task} {missing}"
