"""The workflows a chat request can run, as data.

A workflow is a ``kind`` — how its steps are driven — and, for the fixed chains, its
steps: each a name, the instructions the model gets and how many answer tokens it may
use. The built-ins are registered here like any other; a new chain is one more
``register(Workflow(...))`` with its steps' prompts.

* ``chain``: the steps run in order; each sees the task and every earlier step's output;
  the last step's output is the answer.
* ``agent``: a think → act loop (``react.py``): the model picks a tool or answers.
* ``map_reduce``: the input is split by tokens, each chunk is mapped by its own job (in
  parallel, so on different devices), and the partial results are reduced — in rounds
  when they are many.

Prompts use ``{task}`` (the user's request), ``{context}`` (earlier messages of the
conversation, if any) and, in a chain, ``{<step name>}`` for an earlier step's output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["chain", "agent", "map_reduce"]


@dataclass(frozen=True, slots=True)
class StepTemplate:
    name: str
    instructions: str  # the system message
    prompt: str  # the user message, a template
    max_tokens: int = 384


@dataclass(frozen=True, slots=True)
class Workflow:
    name: str
    kind: Kind
    description: str
    steps: tuple[StepTemplate, ...] = ()


REGISTRY: dict[str, Workflow] = {}


def register(workflow: Workflow) -> Workflow:
    if workflow.name in REGISTRY or workflow.name == "auto":
        raise ValueError(f"workflow {workflow.name!r} is already registered")
    if workflow.kind == "chain" and not workflow.steps:
        raise ValueError("a chain needs at least one step")
    REGISTRY[workflow.name] = workflow
    return workflow


def get(name: str) -> Workflow | None:
    return REGISTRY.get(name)


def names() -> list[str]:
    return [*REGISTRY, "auto"]


register(
    Workflow(
        name="research",
        kind="chain",
        description="research → analyze → write: deep research synthesis",
        steps=(
            StepTemplate(
                "research",
                "You are a careful researcher. List the key facts, figures, open questions "
                "and viewpoints that matter for the task. Use short bullet points.",
                "{context}Task: {task}\n\nList what matters for this task.",
            ),
            StepTemplate(
                "analyze",
                "You are an analyst. Weigh the research notes: what follows from them, what "
                "conflicts, what is most important. Be concise.",
                "{context}Task: {task}\n\nResearch notes:\n{research}\n\nAnalyze these notes.",
            ),
            StepTemplate(
                "write",
                "You write clear, well-organised answers for the reader who asked.",
                "{context}Task: {task}\n\nResearch notes:\n{research}\n\nAnalysis:\n{analyze}"
                "\n\nWrite the final answer to the task.",
                max_tokens=512,
            ),
        ),
    )
)

register(
    Workflow(
        name="code",
        kind="chain",
        description="plan → implement → review: code generation with review",
        steps=(
            StepTemplate(
                "plan",
                "You are a senior engineer. Plan the solution: the approach, the functions "
                "or files, the edge cases. No code yet.",
                "{context}Task: {task}\n\nWrite the plan.",
            ),
            StepTemplate(
                "implement",
                "You are a senior engineer. Implement the plan: complete, working code with "
                "brief comments where they help.",
                "{context}Task: {task}\n\nPlan:\n{plan}\n\nWrite the code.",
                max_tokens=768,
            ),
            StepTemplate(
                "review",
                "You are a strict code reviewer. Check the code against the task, fix every "
                "bug you find, and give the final code with a short note of what changed.",
                "{context}Task: {task}\n\nCode:\n{implement}\n\nReview it and give the "
                "final version.",
                max_tokens=768,
            ),
        ),
    )
)

register(
    Workflow(
        name="agent",
        kind="agent",
        description="think → act (loop): a ReAct agent with a calculator, the time and "
        "the request's own tools",
    )
)

register(
    Workflow(
        name="map_reduce",
        kind="map_reduce",
        description="chunk → map → reduce: analysis of long documents",
        steps=(
            StepTemplate(
                "map",
                "You read one part of a longer document and extract what is relevant to the "
                "task: facts, figures, names, conclusions. Be concise.",
                "Task: {task}\n\nPart {part} of {parts}:\n{chunk}\n\nExtract what is "
                "relevant to the task.",
                max_tokens=256,
            ),
            StepTemplate(
                "reduce",
                "You combine notes taken from the parts of a document into one answer to "
                "the task. Keep every relevant fact; drop repetition.",
                "Task: {task}\n\nNotes from the parts:\n{notes}\n\nCombine them into the answer.",
                max_tokens=512,
            ),
        ),
    )
)
