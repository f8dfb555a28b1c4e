"""The agent's text protocol (ReAct): what the model is told, and how its reply is read.

The model answers in one of two shapes::

    Thought: <reasoning>
    Action: <tool name>
    Action Input: <JSON object>

    Thought: <reasoning>
    Final Answer: <answer>

Replies are read leniently, as real (and small) models write them: labels in any case,
JSON inside code fences or over several lines, text after the JSON ignored, an
``Observation:`` the model invented cut off, and whichever of ``Action`` and ``Final
Answer`` comes first wins. A reply with neither is ``Unparsed``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

MAX_OBSERVATION_CHARS = 1000


@dataclass(frozen=True, slots=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Step:
    """One earlier turn of the loop, replayed to the model."""

    thought: str
    tool: str
    raw_arguments: str
    observation: str


@dataclass(frozen=True, slots=True)
class ToolCall:
    thought: str
    tool: str
    arguments: dict[str, Any] | None  # None: the input was not a JSON object
    raw_arguments: str


@dataclass(frozen=True, slots=True)
class FinalAnswer:
    thought: str
    answer: str


@dataclass(frozen=True, slots=True)
class Unparsed:
    text: str


Reply = ToolCall | FinalAnswer | Unparsed

_SYSTEM = """You solve the user's task step by step and can use tools.

Tools:
{tools}

Answer in exactly one of these two forms.
To use a tool:
Thought: what you need to do next
Action: the tool's name
Action Input: the tool's arguments as one JSON object

When you know the answer:
Thought: why you know it
Final Answer: the answer for the user

Use one tool at a time. After each Action you get an Observation with its result."""

_LABEL = re.compile(r"^\s*(thought|action input|action|final answer|observation)\s*:", re.I | re.M)


def agent_prompt(
    question: str,
    tools: Sequence[ToolSpec],
    history: Sequence[Step],
    max_observation_chars: int = MAX_OBSERVATION_CHARS,
) -> tuple[tuple[str, str], ...]:
    """(role, content) messages for the next turn of the loop."""
    listing = "\n".join(
        f"- {t.name}: {t.description} Arguments: {orjson.dumps(t.parameters).decode()}"
        for t in tools
    )
    lines = [f"Task: {question}"]
    for step in history:
        observation = step.observation
        if len(observation) > max_observation_chars:
            observation = observation[:max_observation_chars] + " [cut]"
        lines += [
            "",
            f"Thought: {step.thought}",
            f"Action: {step.tool}",
            f"Action Input: {step.raw_arguments}",
            f"Observation: {observation}",
        ]
    if history:
        lines += ["", "Continue: the next Thought, then an Action or the Final Answer."]
    return (("system", _SYSTEM.format(tools=listing or "(none)")), ("user", "\n".join(lines)))


def parse_reply(text: str) -> Reply:
    """Reads a model's reply (see the module doc)."""
    sections: list[tuple[str, int, int]] = []  # (label, start of value, start of label)
    for match in _LABEL.finditer(text):
        sections.append((match.group(1).lower(), match.end(), match.start()))
    if not sections:
        return Unparsed(text)
    values: dict[str, str] = {}
    order: list[str] = []
    for index, (label, start, _) in enumerate(sections):
        if label == "observation":
            break  # the model went on to invent the tool's answer
        end = sections[index + 1][2] if index + 1 < len(sections) else len(text)
        if label not in values:
            values[label] = text[start:end].strip()
            order.append(label)
    thought = values.get("thought", "")
    action_first = [label for label in order if label in ("action", "final answer")]
    if not action_first:
        return Unparsed(text)
    if action_first[0] == "final answer":
        return FinalAnswer(thought, values["final answer"])
    tool = values["action"].strip().strip("`'\"").split("\n", 1)[0].strip()
    raw = _json_text(values.get("action input", ""))
    try:
        parsed = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        return ToolCall(thought, tool, None, raw)
    return ToolCall(thought, tool, parsed if isinstance(parsed, dict) else None, raw)


def _json_text(value: str) -> str:
    """The JSON object in an Action Input: fences dropped, text after the object cut."""
    value = re.sub(r"^```(?:json)?\s*|\s*```\s*$", "", value.strip(), flags=re.I).strip()
    start = value.find("{")
    if start < 0:
        return value
    depth, in_string, escaped = 0, False, False
    for index, char in enumerate(value[start:], start):
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return value[start : index + 1]
    return value[start:]
