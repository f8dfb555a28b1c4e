"""Orchestrated chat completions: ``orchestration`` on the request (or the key's auto
default) runs a workflow (workflows/) whose every step is a job of this request's key —
admitted, held, routed with the request's controls, settled at the orchestration rate
(``SWARMGATE_ORCHESTRATION_RATE_BPS``, 1.0x by default) — and answers with the result.

Each step answers with at most its workflow's token allowance, or the request's
``max_tokens`` when that is smaller. Non-streamed, the answer is one chat completion whose ``swarmgate.workflow`` tells the
run's id, workflow, status and cost. Streamed, each finished step is an SSE chunk with
an empty delta and ``swarmgate.workflow_step``; then the answer follows as content
deltas, then the closing chunk and ``[DONE]``. The response starts only once a step has
succeeded, so an early failure is a plain HTTP error.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from swarmgate.accounts.keys import Principal
from swarmgate.api.responses import json_response
from swarmgate.api.running import (
    DONE_FRAME,
    SSE_HEADERS,
    build_route,
    hold_bound,
    new_job_id,
    now_utc,
    run_job,
    sse,
)
from swarmgate.api.schemas import ChatCompletionRequest, Orchestration
from swarmgate.api.streaming import PacedStreamingResponse
from swarmgate.billing.service import prompt_token_bound
from swarmgate.billing.service import usd_number as usd
from swarmgate.errors import RequestError, RoutingError, SwarmgateError
from swarmgate.gateway import Gateway
from swarmgate.memory.service import MemoryTurn
from swarmgate.memory.tokens import TokenCounter
from swarmgate.protocol import ChatMessage, SamplingParams
from swarmgate.routing.dispatch import JobSpec
from swarmgate.workflows import plan, registry
from swarmgate.workflows.engine import (
    Engine,
    NothingRan,
    Result,
    StepFailed,
    StepOutcome,
    StepRecord,
    StepRequest,
)
from swarmgate.workflows.react import ToolSpec

AUTO_ORCHESTRATION = Orchestration(enabled=True, workflow="auto")


class GatewaySteps:
    """Each step a job of the request's key, routed with the request's controls."""

    def __init__(
        self,
        gateway: Gateway,
        principal: Principal,
        body: ChatCompletionRequest,
        model_id: str,
        counter: TokenCounter,
        window: int,
    ) -> None:
        self.gateway = gateway
        self.principal = principal
        self.body = body
        self.model_id = model_id
        self.counter = counter
        self.window = window
        self.rate_bps = gateway.settings.orchestration_rate_bps
        # The request's max_tokens, when given, caps every step's answer.
        self.step_cap = body.max_completion_tokens or body.max_tokens

    def count(self, text: str) -> int:
        return self.counter.count(text)

    def _spec(self, request: StepRequest) -> JobSpec:
        body = self.body
        max_tokens = min(request.max_tokens, self.step_cap or request.max_tokens)
        return JobSpec(
            job_id=new_job_id("chatcmpl-"),
            account_id=self.principal.account_id,
            key_id=self.principal.key_id,
            kind="chat",
            model=self.model_id,
            messages=request.messages,
            params=SamplingParams(
                max_tokens=max_tokens,
                temperature=body.temperature,
                top_p=body.top_p,
                seed=body.seed,
            ),
            stream=False,
            route=build_route(
                self.gateway,
                body,
                self.model_id,
                self.principal,
                request.messages,
                max_tokens,
            ),
            continuation=body.stream_continuation,
            privacy_mode=body.privacy_mode,
            rate_bps=self.rate_bps,
        )

    def max_cost(self, request: StepRequest) -> int:
        """What the step's hold would be (0 when billing is off)."""
        if not self.gateway.billing.enabled:
            return 0
        spec = self._spec(request)
        entry = self.gateway.catalog.get(spec.model)
        cloud = entry is not None and entry.tier != "p2p" and self.gateway.upstreams.serves(entry)
        try:
            pools = (
                self.gateway.registry.check(spec.routing)
                if entry is None or entry.tier != "cloud"
                else []
            )
        except RoutingError:
            pools = []
        bound = prompt_token_bound(m.content for m in spec.messages)
        return hold_bound(spec, entry, cloud, pools, bound)[0]

    async def run(self, request: StepRequest) -> StepOutcome:
        spec = self._spec(request)
        started = time.monotonic()
        try:
            execution, completion, cost = await run_job(self.gateway, self.principal, spec)
        except SwarmgateError as exc:
            raise StepFailed(exc, spec.job_id, int((time.monotonic() - started) * 1000)) from None
        return StepOutcome(
            text=completion.text,
            model=execution.model or spec.model,
            device_id=execution.device.device_id if execution.device else None,
            prompt_tokens=completion.prompt_tokens,
            completion_tokens=completion.completion_tokens,
            cost_micros=cost,
            duration_ms=int((time.monotonic() - started) * 1000),
            job_id=spec.job_id,
        )


def orchestration_for(body: ChatCompletionRequest, principal: Principal) -> Orchestration | None:
    """The request's orchestration, or the key's auto default; None: a plain request."""
    if body.orchestration is not None:
        return body.orchestration if body.orchestration.enabled else None
    return AUTO_ORCHESTRATION if principal.settings.auto_orchestration else None


def _task_and_context(messages: tuple[ChatMessage, ...]) -> tuple[str, str]:
    """The last user message is the task; everything before it, the context."""
    last = max((i for i, m in enumerate(messages) if m.role == "user"), default=None)
    if last is None:
        raise RequestError(
            "An orchestrated request needs a user message: the task.", param="messages"
        )
    earlier = [f"{m.role}: {m.content}" for m in messages[:last]]
    later = [f"{m.role}: {m.content}" for m in messages[last + 1 :]]
    return messages[last].content, "\n".join(earlier + later)


async def orchestrate(
    request: Request,
    gateway: Gateway,
    principal: Principal,
    body: ChatCompletionRequest,
    orchestration: Orchestration,
    job_id: str,
    messages: tuple[ChatMessage, ...],
    turn: MemoryTurn | None,
) -> Response:
    from swarmgate.api.chat import check_max_tokens, memory_models

    model_id = check_max_tokens(gateway, body.model, body.requested_max_tokens(256))
    models = memory_models(gateway, body, model_id, principal) or (model_id,)
    counter = await gateway.memory.counter(models[0])
    window = gateway.memory.window(models, counter)
    task, context = _task_and_context(messages)
    requested = orchestration.workflow
    if requested == "auto":
        name, _why = plan.choose_workflow(
            task, has_tools=bool(body.tools), task_tokens=counter.count(task), window=window
        )
    elif registry.get(requested) is None:
        raise RequestError(
            f"Unknown workflow '{requested}'. Choose one of: {', '.join(registry.names())}.",
            param="orchestration.workflow",
        )
    else:
        name = requested
    workflow = registry.get(name)
    assert workflow is not None
    steps = GatewaySteps(gateway, principal, body, model_id, counter, window)
    budget = plan.Budget(orchestration.max_steps, orchestration.max_cost_micros)
    store = gateway.workflows
    run_id = await store.start(
        account_id=principal.account_id,
        key_id=principal.key_id,
        job_id=job_id,
        workflow=name,
        requested=requested,
        model=model_id,
        task=task,
        max_steps=orchestration.max_steps,
        max_cost_micros=orchestration.max_cost_micros,
    )
    client_tools = [
        ToolSpec(t.function.name, t.function.description, t.function.parameters)
        for t in body.tools or ()
    ]
    created = int(now_utc().timestamp())

    async def execute(on_step: Any) -> Result:
        engine = Engine(steps, budget, on_step=on_step)
        try:
            result = await engine.run(workflow, task, context=context, client_tools=client_tools)
        except NothingRan as exc:
            await store.finish(run_id, "stopped", exc.reason)
            param = (
                "orchestration.max_steps"
                if exc.reason == "max_steps"
                else "orchestration.max_cost_usd"
            )
            raise RequestError(
                f"The orchestration budget allows no step of '{name}' "
                f"({exc.reason}); nothing ran and nothing was charged.",
                param=param,
                code="ORCHESTRATION_BUDGET_TOO_LOW",
            ) from None
        except BaseException:
            await asyncio.shield(store.finish(run_id, "failed", "step_failed"))
            raise
        if turn is not None and result.status != "tool_calls":
            await gateway.memory.commit(turn, result.answer, job_id=job_id, model=model_id)
        await store.finish(
            run_id, result.status, result.stop_reason, [s.tool or "" for s in result.steps]
        )
        return result

    def info(result: Result) -> dict[str, Any]:
        out: dict[str, Any] = {
            "inference_type": "orchestrated",
            "workflow": {
                "id": run_id,
                "type": name,
                "requested": requested,
                "status": result.status,
                "stop_reason": result.stop_reason,
                "steps_executed": len(result.steps),
                "total_cost_micros": result.cost_micros,
                "total_cost_usd": usd(result.cost_micros),
            },
        }
        if turn is not None:
            out["conversation_id"] = turn.conversation_id
        return out

    def usage(result: Result) -> dict[str, int]:
        prompt = sum(s.prompt_tokens for s in result.steps)
        completion = sum(s.completion_tokens for s in result.steps)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    headers = {"X-Workflow-ID": run_id}
    if not body.stream:

        async def record(step: StepRecord) -> None:
            await store.step(run_id, step)

        result = await execute(record)
        message: dict[str, Any] = {"role": "assistant", "content": result.answer}
        finish = "stop" if result.status in ("completed",) else "length"
        if result.tool_calls:
            message = {"role": "assistant", "content": None, "tool_calls": result.tool_calls}
            finish = "tool_calls"
        return json_response(
            {
                "id": job_id,
                "object": "chat.completion",
                "created": created,
                "model": model_id,
                "choices": [
                    {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
                ],
                "usage": usage(result),
                "system_fingerprint": None,
                "swarmgate": info(result),
            },
            headers=headers,
        )

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(
        delta: dict[str, Any], finish: str | None, extra: dict[str, Any] | None = None
    ) -> bytes:
        payload: dict[str, Any] = {
            "id": job_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model_id,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            payload["usage"] = None
        if extra:
            payload["swarmgate"] = extra
        return sse(payload)

    progress: asyncio.Queue[StepRecord | None] = asyncio.Queue()

    async def on_step(record: StepRecord) -> None:
        await store.step(run_id, record)
        progress.put_nowait(record)

    task_ = asyncio.create_task(execute(on_step))
    task_.add_done_callback(lambda _t: progress.put_nowait(None))
    # Nothing is sent before the first step has finished: a run that fails (or that its
    # budget stops) before then is a plain HTTP error, as a stream is before its first
    # token.
    early: list[StepRecord] = []  # failed steps before the first success, replayed
    try:
        while (got := await progress.get()) is not None:
            early.append(got)
            if got.status == "succeeded":
                break
    except BaseException:
        task_.cancel()
        raise
    if got is None and not task_.cancelled():
        error = task_.exception()
        if error is not None:
            raise error

    async def events() -> AsyncIterator[bytes]:
        try:
            yield chunk(
                {"role": "assistant", "content": ""},
                None,
                {"workflow_id": run_id, "workflow": name},
            )
            for step in early:
                yield chunk({}, None, {"workflow_step": step.describe()})
            if got is not None:
                while (later := await progress.get()) is not None:
                    yield chunk({}, None, {"workflow_step": later.describe()})
            try:
                result = task_.result()
            except SwarmgateError as exc:
                yield sse(exc.to_dict())
                return
            if result.tool_calls:
                calls = [{"index": i, **call} for i, call in enumerate(result.tool_calls)]
                yield chunk({"tool_calls": calls}, None)
                finish = "tool_calls"
            else:
                for piece in _pieces(result.answer):
                    yield chunk({"content": piece}, None)
                finish = "stop" if result.status == "completed" else "length"
            yield chunk({}, finish, info(result))
            if include_usage:
                yield sse(
                    {
                        "id": job_id,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model_id,
                        "system_fingerprint": None,
                        "choices": [],
                        "usage": usage(result),
                        "swarmgate": info(result),
                    }
                )
            yield DONE_FRAME
        finally:
            if not task_.done():
                task_.cancel()

    return PacedStreamingResponse(
        events(),
        stall_timeout_s=gateway.settings.client_stall_timeout_s,
        media_type="text/event-stream",
        headers={**SSE_HEADERS, **headers},
    )


def _pieces(text: str, size: int = 24) -> list[str]:
    """The answer as stream deltas of a few words each."""
    words = text.split(" ")
    return [
        " ".join(words[i : i + size]) + (" " if i + size < len(words) else "")
        for i in range(0, len(words), size)
    ]
