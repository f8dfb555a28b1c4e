"""Running a workflow: its steps as jobs, within a budget.

The engine drives the steps of a workflow (``registry.py``) through a ``StepRunner`` —
in the gateway, each step is a job admitted, held, run and settled like any request
(``api/orchestration.py``); in tests, anything that answers. Before each step it asks
the budget (``plan.Budget``) whether the step's hold still fits ``max_steps`` and
``max_cost``; if not, the run stops there and returns what it has (the latest output)
with ``status: "stopped"`` and the reason. A step whose job fails after failover ends
the run as ``failed`` with what it has — or, when nothing ran yet, with that job's own
error, uncharged.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from swarmgate.errors import SwarmgateError
from swarmgate.protocol import ChatMessage
from swarmgate.workflows import plan, react
from swarmgate.workflows.registry import StepTemplate, Workflow
from swarmgate.workflows.tools import BUILTIN_TOOLS, Tool, run_tool

AGENT_STEP_TOKENS = 384


@dataclass(frozen=True, slots=True)
class StepRequest:
    name: str
    messages: tuple[ChatMessage, ...]
    max_tokens: int


@dataclass(frozen=True, slots=True)
class StepOutcome:
    text: str
    model: str | None
    device_id: str | None
    prompt_tokens: int
    completion_tokens: int
    cost_micros: int
    duration_ms: int
    job_id: str


class StepFailed(Exception):
    def __init__(self, error: SwarmgateError, job_id: str | None, duration_ms: int) -> None:
        super().__init__(error.message)
        self.error = error
        self.job_id = job_id
        self.duration_ms = duration_ms


class StepRunner(Protocol):
    window: int

    def count(self, text: str) -> int: ...

    def max_cost(self, request: StepRequest) -> int: ...

    async def run(self, request: StepRequest) -> StepOutcome: ...


@dataclass(slots=True)
class StepRecord:
    index: int
    name: str
    status: str  # succeeded | failed
    model: str | None = None
    device_id: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_micros: int = 0
    duration_ms: int = 0
    job_id: str | None = None
    error_code: str | None = None
    tool: str | None = None  # agent steps: the tool the model called

    def describe(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "status": self.status,
            "model": self.model,
            "device_id": self.device_id,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost_micros": self.cost_micros,
            "duration_ms": self.duration_ms,
            "job_id": self.job_id,
            "error_code": self.error_code,
            "tool": self.tool,
        }


@dataclass(slots=True)
class Result:
    workflow: str
    status: str  # completed | stopped | failed | tool_calls
    answer: str
    steps: list[StepRecord] = field(default_factory=list)
    stop_reason: str | None = None  # max_steps | max_cost | step_failed
    tool_calls: list[dict[str, Any]] | None = None  # the client's tools the agent called

    @property
    def cost_micros(self) -> int:
        return sum(s.cost_micros for s in self.steps)


OnStep = Callable[[StepRecord], Awaitable[None]]


class NothingRan(Exception):
    """The budget allowed no step at all."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def fill(template: str, values: Mapping[str, str]) -> str:
    """``{name}`` placeholders replaced once (values are never read as templates)."""
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


class Engine:
    def __init__(
        self,
        runner: StepRunner,
        budget: plan.Budget,
        *,
        on_step: OnStep | None = None,
        tools: Mapping[str, Tool] = BUILTIN_TOOLS,
    ) -> None:
        self.runner = runner
        self.budget = budget
        self.on_step = on_step
        self.tools = tools
        self.steps: list[StepRecord] = []

    async def run(
        self,
        workflow: Workflow,
        task: str,
        *,
        context: str = "",
        client_tools: Sequence[react.ToolSpec] = (),
    ) -> Result:
        if workflow.kind == "chain":
            return await self._chain(workflow, task, context)
        if workflow.kind == "agent":
            return await self._agent(workflow, task, context, client_tools)
        return await self._map_reduce(workflow, task)

    # -- one step ---------------------------------------------------------------------
    async def _step(self, request: StepRequest, tool: str | None = None) -> StepOutcome:
        """Runs one step; steps are numbered in the order they finish (parallel ones too)."""
        try:
            outcome = await self.runner.run(request)
        except StepFailed as exc:
            record = StepRecord(
                len(self.steps) + 1,
                request.name,
                "failed",
                duration_ms=exc.duration_ms,
                job_id=exc.job_id,
                error_code=exc.error.code,
            )
            self.steps.append(record)
            self.budget.record(0)
            await self._report(record)
            raise
        record = StepRecord(
            len(self.steps) + 1,
            request.name,
            "succeeded",
            model=outcome.model,
            device_id=outcome.device_id,
            prompt_tokens=outcome.prompt_tokens,
            completion_tokens=outcome.completion_tokens,
            cost_micros=outcome.cost_micros,
            duration_ms=outcome.duration_ms,
            job_id=outcome.job_id,
            tool=tool,
        )
        self.steps.append(record)
        self.budget.record(outcome.cost_micros)
        await self._report(record)
        return outcome

    async def _report(self, record: StepRecord) -> None:
        if self.on_step is not None:
            await self.on_step(record)

    def _result(self, workflow: Workflow, status: str, answer: str, **extra: Any) -> Result:
        return Result(workflow.name, status, answer, list(self.steps), **extra)

    def _failed(self, workflow: Workflow, exc: StepFailed, answer: str) -> Result:
        if not any(s.status == "succeeded" for s in self.steps):
            raise exc.error
        return self._result(workflow, "failed", answer, stop_reason="step_failed")

    # -- chains -----------------------------------------------------------------------
    async def _chain(self, workflow: Workflow, task: str, context: str) -> Result:
        values = {"task": task, "context": _context_block(context)}
        answer = ""
        for template in workflow.steps:
            request = _request(template, values)
            reason = self.budget.stop_reason(self.runner.max_cost(request))
            if reason is not None:
                return self._stopped(workflow, reason, answer)
            try:
                outcome = await self._step(request)
            except StepFailed as exc:
                return self._failed(workflow, exc, answer)
            values[template.name] = outcome.text.strip()
            answer = outcome.text
        return self._result(workflow, "completed", answer)

    def _stopped(self, workflow: Workflow, reason: str, answer: str) -> Result:
        if not self.steps:
            raise NothingRan(reason)
        return self._result(workflow, "stopped", answer, stop_reason=reason)

    # -- the agent --------------------------------------------------------------------
    async def _agent(
        self,
        workflow: Workflow,
        task: str,
        context: str,
        client_tools: Sequence[react.ToolSpec],
    ) -> Result:
        own = {
            name: react.ToolSpec(tool.name, tool.description, tool.parameters)
            for name, tool in self.tools.items()
        }
        clients = {spec.name: spec for spec in client_tools}
        specs = [*own.values(), *(s for s in client_tools if s.name not in own)]
        question = f"{_context_block(context)}{task}"
        history: list[react.Step] = []
        answer = ""
        while True:
            messages = tuple(
                ChatMessage(role=role, content=text)  # type: ignore[arg-type]
                for role, text in react.agent_prompt(question, specs, history)
            )
            request = StepRequest(f"think {len(self.steps) + 1}", messages, AGENT_STEP_TOKENS)
            reason = self.budget.stop_reason(self.runner.max_cost(request))
            if reason is not None:
                return self._stopped(workflow, reason, answer)
            try:
                outcome = await self._step(request)
            except StepFailed as exc:
                return self._failed(workflow, exc, answer)
            reply = react.parse_reply(outcome.text)
            if isinstance(reply, react.FinalAnswer):
                return self._result(workflow, "completed", reply.answer)
            if isinstance(reply, react.Unparsed):
                return self._result(workflow, "completed", outcome.text.strip())
            self.steps[-1].tool = reply.tool
            answer = reply.thought or answer
            if reply.tool in own:
                arguments = reply.arguments if reply.arguments is not None else reply.raw_arguments
                observation = run_tool(self.tools, reply.tool, arguments)
            elif reply.tool in clients:
                call = {
                    "id": f"call_{len(self.steps)}_{reply.tool}"[:64],
                    "type": "function",
                    "function": {"name": reply.tool, "arguments": reply.raw_arguments or "{}"},
                }
                return self._result(workflow, "tool_calls", reply.thought, tool_calls=[call])
            else:
                observation = f"error: unknown tool {reply.tool!r}; use one of the listed tools"
            history.append(react.Step(reply.thought, reply.tool, reply.raw_arguments, observation))

    # -- map_reduce -------------------------------------------------------------------
    async def _map_reduce(self, workflow: Workflow, task: str) -> Result:
        mapper, reducer = workflow.steps
        window = self.runner.window
        chunk_tokens = max(32, window // 2 - mapper.max_tokens - 200)
        chunks = plan.split_chunks(task, self.runner.count, chunk_tokens)
        instruction = _instruction(task)
        if len(chunks) <= 1:
            request = _request(reducer, {"task": instruction, "notes": task})
            reason = self.budget.stop_reason(self.runner.max_cost(request))
            if reason is not None:
                raise NothingRan(reason)
            try:
                outcome = await self._step(request)
            except StepFailed as exc:
                return self._failed(workflow, exc, "")
            return self._result(workflow, "completed", outcome.text)
        maps = [
            _request(
                mapper,
                {"task": instruction, "part": str(i + 1), "parts": str(len(chunks)), "chunk": c},
                name=f"map {i + 1}/{len(chunks)}",
            )
            for i, c in enumerate(chunks)
        ]
        final_room = _request(reducer, {"task": instruction, "notes": "x" * (window // 4)})
        reserve = self.runner.max_cost(final_room)
        allowed = 0
        cost = 0
        for request in maps:
            cost += self.runner.max_cost(request)
            if self.budget.stop_reason(cost + reserve, steps=allowed + 2) is not None:
                break
            allowed += 1
        if allowed == 0:
            raise NothingRan(self.budget.stop_reason(cost + reserve, steps=2) or "max_steps")
        stop = (
            None
            if allowed == len(maps)
            else self.budget.stop_reason(cost + reserve, steps=allowed + 2)
        )
        outcomes = await asyncio.gather(
            *(self._step(r) for r in maps[:allowed]), return_exceptions=True
        )
        notes = [o.text.strip() for o in outcomes if isinstance(o, StepOutcome)]
        failures = [o for o in outcomes if isinstance(o, StepFailed)]
        for other in outcomes:
            if isinstance(other, BaseException) and not isinstance(other, StepFailed):
                raise other
        if not notes:
            assert failures
            raise failures[0].error
        answer = await self._reduce(workflow, reducer, instruction, notes)
        if stop is not None:
            return self._result(workflow, "stopped", answer, stop_reason=stop)
        if failures:
            return self._result(workflow, "failed", answer, stop_reason="step_failed")
        return self._result(workflow, "completed", answer)

    async def _reduce(
        self, workflow: Workflow, reducer: StepTemplate, task: str, notes: list[str]
    ) -> str:
        """Reduces in rounds until one answer is left; a round's groups run in parallel.
        A round the budget cannot pay for is skipped for one last reduce of all notes
        (cut to fit), which the budget reserved."""
        room = self.runner.window - reducer.max_tokens - 300
        rounds = 0
        while len(notes) > 1:
            groups = plan.reduce_groups([self.runner.count(n) for n in notes], room)
            if len(groups) == 1:
                break
            jobs = [g for g in groups if len(g) > 1]  # a lone note waits for the next round
            requests = [
                _request(
                    reducer,
                    {"task": task, "notes": _numbered([notes[i] for i in g])},
                    name=f"reduce {rounds + 1}.{j + 1}",
                )
                for j, g in enumerate(jobs)
            ]
            cost = sum(self.runner.max_cost(r) for r in requests)
            if self.budget.stop_reason(cost, steps=len(requests) + 1) is not None:
                break
            outcomes = await asyncio.gather(
                *(self._step(r) for r in requests), return_exceptions=True
            )
            merged = [notes[g[0]] for g in groups if len(g) == 1]
            for group, outcome in zip(jobs, outcomes, strict=True):
                if isinstance(outcome, StepOutcome):
                    merged.append(outcome.text.strip())
                else:  # a failed group keeps its notes for the final reduce
                    merged.extend(notes[i] for i in group)
            if len(merged) >= len(notes):
                break
            notes = merged
            rounds += 1
        body = _numbered(notes)
        while self.runner.count(body) > room and len(body) > 200:
            body = body[: int(len(body) * 0.8)]
        request = _request(reducer, {"task": task, "notes": body}, name="reduce (final)")
        try:
            outcome = await self._step(request)
        except StepFailed:
            return "\n\n".join(notes)
        return outcome.text


def _request(
    template: StepTemplate, values: Mapping[str, str], name: str | None = None
) -> StepRequest:
    return StepRequest(
        name or template.name,
        (
            ChatMessage(role="system", content=template.instructions),
            ChatMessage(role="user", content=fill(template.prompt, values)),
        ),
        template.max_tokens,
    )


def _context_block(context: str) -> str:
    return f"Conversation so far:\n{context}\n\n" if context else ""


def _numbered(notes: Sequence[str]) -> str:
    return "\n\n".join(f"[{i + 1}] {note}" for i, note in enumerate(notes))


def _instruction(text: str) -> str:
    """What a long input asks for: its first paragraph when short, else a generic ask."""
    first = text.strip().split("\n\n", 1)[0]
    if len(first) <= 500 and len(first) < len(text) // 2:
        return first
    return "Summarise the document and answer any question it asks."
