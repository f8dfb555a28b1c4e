"""``/v1/workflows``: orchestration runs (list, one with its steps) and cost estimates."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from swarmgate.api.deps import CurrentPrincipal, GatewayDep, read_body
from swarmgate.api.responses import json_response
from swarmgate.api.running import at_rate
from swarmgate.api.schemas import Message, body_schema, parse_body
from swarmgate.billing.service import usd_number as usd
from swarmgate.errors import ModelNotFound, NotFound, RequestError
from swarmgate.workflows import plan, registry

router = APIRouter(prefix="/v1/workflows", tags=["workflows"])

_MAX_BODY = 4 * 1024 * 1024
# Past this a page is empty anyway; a larger number would not fit the database's integer.
MAX_OFFSET = 1_000_000_000
_ASSUMED_INPUT_TOKENS = 200


class EstimateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(min_length=1, max_length=200)
    workflow: str = Field(default="auto", min_length=1, max_length=32)
    max_steps: int = Field(default=10, ge=1, le=100)
    # The input, to size the estimate (else a short prompt is assumed).
    messages: list[Message] | None = Field(default=None, min_length=1, max_length=10_000)
    input: str | None = Field(default=None, max_length=1_000_000)


@router.get("", summary="List your orchestration runs, newest first", response_model=None)
async def list_workflows(
    principal: CurrentPrincipal,
    gateway: GatewayDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> Response:
    runs, total = await gateway.workflows.page(principal.account_id, limit=limit, offset=offset)
    return json_response({"workflows": runs, "total": total, "object": "list"})


@router.get("/{workflow_id}", summary="One run and each of its steps", response_model=None)
async def get_workflow(
    workflow_id: Annotated[str, Field(max_length=64)],
    principal: CurrentPrincipal,
    gateway: GatewayDep,
) -> Response:
    found = await gateway.workflows.get(principal.account_id, workflow_id)
    if found is None:
        raise NotFound(
            f"No workflow run '{workflow_id}'.", param="workflow_id", code="WORKFLOW_NOT_FOUND"
        )
    return json_response(found)


@router.post(
    "/estimate",
    summary="A cost range before running a workflow",
    response_model=None,
    openapi_extra=body_schema(EstimateRequest),
)
async def estimate_workflow(
    request: Request, principal: CurrentPrincipal, gateway: GatewayDep
) -> Response:
    body = parse_body(EstimateRequest, await read_body(request, _MAX_BODY))
    entry = gateway.catalog.get(body.model)
    if entry is None:
        raise ModelNotFound(
            f"The model '{body.model}' does not exist. GET /v1/models lists the models.",
            param="model",
        )
    counter = await gateway.memory.counter(body.model)
    window = gateway.memory.window([body.model], counter)
    text = body.input or ""
    if body.messages:
        users = [m.text for m in body.messages if m.role == "user"]
        text = users[-1] if users else body.messages[-1].text
    tokens = counter.count(text) if text else _ASSUMED_INPUT_TOKENS
    name, why = body.workflow, None
    if name == "auto":
        name, why = plan.choose_workflow(text, has_tools=False, task_tokens=tokens, window=window)
    workflow = registry.get(name)
    if workflow is None:
        raise RequestError(
            f"Unknown workflow '{name}'. Choose one of: {', '.join(registry.names())}.",
            param="workflow",
        )
    # Devices may charge up to the gateway's ceiling over the catalog's price.
    ceiling = at_rate(entry.pricing, gateway.settings.device_price_max_bps)
    pricing = at_rate(ceiling, gateway.settings.orchestration_rate_bps)
    chunk_tokens = max(32, window // 2 - 256 - 200)
    found = plan.estimate(
        workflow,
        input_tokens=tokens,
        pricing=pricing,
        window=window,
        max_steps=body.max_steps,
        chunk_tokens=chunk_tokens,
    )
    out: dict[str, Any] = {
        "object": "workflow.estimate",
        "model": body.model,
        "workflow": name,
        "input_tokens": tokens,
        "input_assumed": not text,
        "steps": {"min": found.steps_min, "max": found.steps_max},
        "estimated_cost_micros": {"min": found.cost_min_micros, "max": found.cost_max_micros},
        "estimated_cost_usd": {
            "min": usd(found.cost_min_micros),
            "max": usd(found.cost_max_micros),
        },
        "rate_bps": gateway.settings.orchestration_rate_bps,
        "steps_plan": [s.name for s in workflow.steps] or ["think → act (loop)"],
    }
    if why is not None:
        out["chosen_because"] = why
    return json_response(out)
