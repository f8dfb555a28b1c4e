"""The agent's built-in tools and its text protocol (tables)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from swarmgate.workflows.react import (
    FinalAnswer,
    Step,
    ToolCall,
    ToolSpec,
    Unparsed,
    agent_prompt,
    parse_reply,
)
from swarmgate.workflows.tools import (
    BUILTIN_TOOLS,
    MAX_RESULT_CHARS,
    Tool,
    calculate,
    current_time_tool,
    openai_tool_specs,
    run_tool,
)


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("17 * 23", "391"),
        ("1 + 2 * 3", "7"),
        ("(1 + 2) * 3", "9"),
        ("7 / 2", "3.5"),
        ("7 // 2", "3"),
        ("7 % 4", "3"),
        ("2 ** 10", "1024"),
        ("2 ^ 10", "1024"),
        ("-3 + +5", "2"),
        ("sqrt(16)", "4"),
        ("abs(-2.5)", "2.5"),
        ("round(2.567, 2)", "2.57"),
        ("min(4, 2, 8)", "2"),
        ("max(4, 2, 8)", "8"),
        ("floor(2.7) + ceil(2.1)", "5"),
        ("log(e)", "1"),
        ("exp(0)", "1"),
        ("sin(0) + cos(0) + tan(0)", "1"),
        ("pi", "3.14159265359"),
        ("0.1 + 0.2", "0.3"),
        ("10 ** 100", str(10**100)),
    ],
)
def test_the_calculator_computes(expression: str, value: str) -> None:
    assert calculate(expression) == value


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os').system('ls')",
        "open('/etc/passwd')",
        "x",
        "().__class__",
        "(1).real",
        "lambda: 1",
        "[i for i in range(10)]",
        "eval('1')",
        "sqrt(x=4)",
        "9 ** 9 ** 9",
        "2 ** 5000",
        "10 ** 101",
        "10 ** 100 * 10",
        "round(1.5, 10 ** 99)",
        "1 / 0",
        "1 % 0",
        "exp(100000)",
        "log(0)",
        "1 +",
        "'text'",
        "True + 1",
        "1" * 501,
        "1 if 1 else 2",
        "1 < 2",
    ],
)
def test_the_calculator_refuses_everything_else(expression: str) -> None:
    result = calculate(expression)
    assert result.startswith("error:"), result


def test_current_time_with_a_fixed_clock() -> None:
    tool = current_time_tool(lambda: datetime(2026, 11, 22, 14, 30, tzinfo=UTC))
    assert tool.run({}) == "2026-11-22T14:30:00+00:00 (Sunday, UTC)"
    assert tool.run({"timezone": "Asia/Tokyo"}) == "2026-11-22T23:30:00+09:00 (Sunday, Asia/Tokyo)"
    assert tool.run({"timezone": "Mars/Olympus"}).startswith("error:")
    assert tool.run({"timezone": "../../etc/passwd"}).startswith("error:")
    assert tool.run({"timezone": 5}).startswith("error:")


def test_run_tool() -> None:
    assert run_tool(BUILTIN_TOOLS, "calculator", '{"expression": "2 + 2"}') == "4"
    assert run_tool(BUILTIN_TOOLS, "calculator", {"expression": "2 + 2"}) == "4"
    assert run_tool(BUILTIN_TOOLS, "calculator", "{nope").startswith("error:")
    assert run_tool(BUILTIN_TOOLS, "calculator", "[1]").startswith("error:")
    assert run_tool(BUILTIN_TOOLS, "calculator", "{}").startswith("error:")
    assert run_tool(BUILTIN_TOOLS, "shell", "{}").startswith("error: unknown tool")

    def noisy(_arguments: dict[str, object]) -> str:
        return "x" * 10_000

    def broken(_arguments: dict[str, object]) -> str:
        raise RuntimeError("boom")

    tools = {"noisy": Tool("noisy", "", {}, noisy), "broken": Tool("broken", "", {}, broken)}
    assert len(run_tool(tools, "noisy", "{}")) == MAX_RESULT_CHARS
    assert run_tool(tools, "broken", "{}") == "error: RuntimeError"


def test_openai_tool_specs() -> None:
    specs = openai_tool_specs(BUILTIN_TOOLS.values())
    assert {s["function"]["name"] for s in specs} == {"calculator", "current_time"}
    for spec in specs:
        assert spec["type"] == "function" and spec["function"]["parameters"]["type"] == "object"


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (
            'Thought: multiply\nAction: calculator\nAction Input: {"expression": "2*3"}',
            ToolCall("multiply", "calculator", {"expression": "2*3"}, '{"expression": "2*3"}'),
        ),
        (
            "Thought: done\nFinal Answer: It is 6.",
            FinalAnswer("done", "It is 6."),
        ),
        (
            'thought: lower case\naction: calculator\naction input: {"expression": "1"}',
            ToolCall("lower case", "calculator", {"expression": "1"}, '{"expression": "1"}'),
        ),
        (
            'Thought: fenced\nAction: calculator\nAction Input: ```json\n{"expression": "1"}\n```',
            ToolCall("fenced", "calculator", {"expression": "1"}, '{"expression": "1"}'),
        ),
        (
            'Thought: t\nAction: calculator\nAction Input: {\n  "expression": "1 + 1"\n}\nI will wait.',
            ToolCall("t", "calculator", {"expression": "1 + 1"}, '{\n  "expression": "1 + 1"\n}'),
        ),
        (
            'Thought: t\nAction: calculator\nAction Input: {"expression": "1"}\nObservation: 1\n'
            "Thought: so\nFinal Answer: 1",
            ToolCall("t", "calculator", {"expression": "1"}, '{"expression": "1"}'),
        ),
        (
            'Thought: t\nFinal Answer: 5\nAction: calculator\nAction Input: {"expression": "1"}',
            FinalAnswer("t", "5"),
        ),
        (
            "Thought: t\nAction: calculator\nAction Input: 2 + 2",
            ToolCall("t", "calculator", None, "2 + 2"),
        ),
        (
            'Thought: t\nAction: `calculator`\nAction Input: {"expression": "a \\"}\\" b"}',
            ToolCall("t", "calculator", {"expression": 'a "}" b'}, '{"expression": "a \\"}\\" b"}'),
        ),
        ("Action: current_time\nAction Input: {}", ToolCall("", "current_time", {}, "{}")),
        ("Action: current_time", ToolCall("", "current_time", {}, "")),
        ("Final Answer:   Paris  ", FinalAnswer("", "Paris")),
        (
            "Final Answer: line one\nline two",
            FinalAnswer("", "line one\nline two"),
        ),
        ("Paris is the capital.", Unparsed("Paris is the capital.")),
        ("Thought: only thinking", Unparsed("Thought: only thinking")),
        ("", Unparsed("")),
    ],
)
def test_replies_are_read_leniently(reply: str, expected: object) -> None:
    assert parse_reply(reply) == expected


def test_the_prompt_lists_tools_and_replays_the_transcript() -> None:
    tools = [ToolSpec("calculator", "Arithmetic.", {"type": "object"})]
    history = [
        Step("first", "calculator", '{"expression": "1"}', "1"),
        Step("second", "calculator", "{}", "x" * 5000),
    ]
    (system_role, system), (user_role, user) = agent_prompt("What is 1?", tools, history)
    assert (system_role, user_role) == ("system", "user")
    assert "- calculator: Arithmetic." in system and "Final Answer:" in system
    assert user.startswith("Task: What is 1?")
    assert user.index("Thought: first") < user.index("Thought: second")
    assert "Observation: 1\n" in user
    assert "x" * 1000 + " [cut]" in user and "x" * 1001 not in user
    _, (_, fresh) = agent_prompt("Q", tools, [])
    assert fresh == "Task: Q"
