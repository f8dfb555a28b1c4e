"""``POST /v1/inference`` (prompt in, output out) and asynchronous ``/v1/jobs``."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
from fastapi import APIRouter, Request
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection
from starlette.responses import Response

from swarmgate.accounts.keys import Principal
from swarmgate.api.chat import check_max_tokens, resolve_model
from swarmgate.api.deps import CurrentPrincipal, GatewayDep, read_body
from swarmgate.api.responses import json_response
from swarmgate.api.running import (
    AUTO_MODEL,
    DONE_FRAME,
    ClientGone,
    admit,
    build_route,
    complete_or_cancel,
    new_job_id,
    now_utc,
    open_stream,
    release,
    settle,
    sse,
    stream_response,
    swarmgate_info,
)
from swarmgate.api.schemas import InferenceRequest, JobRequest, body_schema, parse_body
from swarmgate.errors import Forbidden, NotFound, RequestError
from swarmgate.gateway import Gateway
from swarmgate.protocol import ChatMessage, Delta, Done, SamplingParams
from swarmgate.routing.choice import route_to_json
from swarmgate.routing.dispatch import JobSpec
from swarmgate.store.db import as_utc, iso
from swarmgate.store.tables import job_attempts, jobs

router = APIRouter(tags=["inference"])


@router.post(
    "/v1/inference",
    openapi_extra=body_schema(InferenceRequest),
    summary="Generate text from a prompt",
    response_model=None,
)
async def create_inference(
    request: Request, principal: CurrentPrincipal, gateway: GatewayDep
) -> Response:
    return await inference(request, gateway, principal)


async def inference(request: Request, gateway: Gateway, principal: Principal) -> Response:
    """The endpoint itself; served from the hot path (``api/hotpath.py``) in the gateway."""
    body = parse_body(InferenceRequest, await read_body(request, gateway.settings.max_body_bytes))
    model_id = check_max_tokens(gateway, body.model, body.max_tokens)
    job_id = new_job_id("inf_")
    messages = (ChatMessage(role="user", content=body.prompt),)
    spec = JobSpec(
        job_id=job_id,
        account_id=principal.account_id,
        key_id=principal.key_id,
        kind="inference",
        model=model_id,
        route=build_route(gateway, body, model_id, principal, messages, body.max_tokens),
        continuation=body.stream_continuation,
        privacy_mode=body.privacy_mode,
        messages=messages,
        params=SamplingParams(
            max_tokens=body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=body.stop or [],
            seed=body.seed,
        ),
        stream=body.stream,
    )
    admitted = await admit(gateway, principal, spec)
    execution = gateway.execution(admitted.spec)
    created_at = now_utc()
    created = int(created_at.timestamp())

    def provider() -> dict[str, Any]:
        device = execution.device
        return {"region": device.region if device else None, "latency_ms": execution.latency_ms}

    if not body.stream:
        try:
            completion = await complete_or_cancel(request, execution)
            await settle(gateway, admitted, execution)
        except ClientGone:
            return Response(status_code=499)
        finally:
            release(gateway, admitted)
            gateway.job_log.record(execution, created_at)
        return json_response(
            {
                "id": job_id,
                "object": "inference",
                "created": created,
                "model": execution.model or model_id,
                "output": completion.text,
                "finish_reason": completion.finish_reason,
                "usage": {
                    "prompt_tokens": completion.prompt_tokens,
                    "completion_tokens": completion.completion_tokens,
                    "total_tokens": completion.prompt_tokens + completion.completion_tokens,
                },
                "provider": provider(),
                "swarmgate": swarmgate_info(execution),
            }
        )

    try:
        first, events = await open_stream(execution)
    except BaseException:
        release(gateway, admitted)
        gateway.job_log.record(execution, created_at)
        raise

    def frames(event: Delta | Done | None) -> list[bytes]:
        if event is None:
            return [DONE_FRAME]
        if isinstance(event, Delta):
            return [sse({"id": job_id, "object": "inference.chunk", "output": event.text})]
        usage = event.usage
        return [
            sse(
                {
                    "id": job_id,
                    "object": "inference.chunk",
                    "output": "",
                    "finish_reason": event.finish_reason,
                    "usage": {
                        "prompt_tokens": usage.prompt_tokens,
                        "completion_tokens": usage.completion_tokens,
                        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
                    },
                    "provider": provider(),
                    "swarmgate": swarmgate_info(execution),
                }
            )
        ]

    return stream_response(gateway, execution, first, events, created_at, frames, admitted)


@router.post(
    "/v1/jobs",
    openapi_extra=body_schema(JobRequest),
    summary="Queue an inference job; poll GET /v1/jobs/{id} for the result",
    status_code=202,
    response_model=None,
)
async def create_job(
    request: Request, principal: CurrentPrincipal, gateway: GatewayDep
) -> Response:
    body = parse_body(JobRequest, await read_body(request, gateway.settings.max_body_bytes))
    if (body.prompt is None) == (body.messages is None):
        raise RequestError("Send exactly one of 'prompt' or 'messages'.", param="prompt")
    if body.model == AUTO_MODEL:
        raise RequestError(
            "Queued jobs need a catalog model, not 'auto': the device is chosen when the job "
            "runs. Use fallback_models for alternatives.",
            param="model",
        )
    model_id = check_max_tokens(gateway, body.model, body.max_tokens)
    if body.messages is not None:
        messages = [{"role": m.chat_role, "content": m.text} for m in body.messages]
    else:
        messages = [{"role": "user", "content": body.prompt or ""}]
    params = SamplingParams(
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stop or [],
        seed=body.seed,
    )
    chat = tuple(ChatMessage(**m) for m in messages)  # type: ignore[arg-type]
    route = build_route(gateway, body, model_id, principal, chat, body.max_tokens)
    if gateway.registry.pools_for(route):
        # A queued job may wait for a device, but not for constraints none can meet.
        gateway.registry.check(route)
    spec = JobSpec(
        job_id=new_job_id("job_"),
        account_id=principal.account_id,
        key_id=principal.key_id,
        kind="async",
        model=model_id,
        route=route,
        messages=chat,
        params=params,
        stream=False,
        privacy_mode=body.privacy_mode,
    )
    stored = orjson.dumps(
        {
            "messages": messages,
            "params": params.model_dump(),
            "route": route_to_json(route),
            "privacy_mode": body.privacy_mode,
        }
    )
    model = resolve_model(gateway, model_id)
    if not principal.settings.allows(model.id):
        raise Forbidden(
            f"This API key may not use the model '{model.id}'.",
            param="model",
            code="MODEL_NOT_ALLOWED",
        )
    if gateway.billing.enabled:
        created: list[datetime] = []

        async def store_job(conn: AsyncConnection, hold_id: str) -> None:
            created.append(await gateway.background.insert(conn, spec, stored, hold_id))

        # Held in the ledger, not in memory: a queued job keeps its credit across
        # restarts; the hold and the job's row are committed together.
        await gateway.billing.hold(
            principal,
            model=model.id,
            pricing=model.pricing,
            amount_micros=gateway.billing.quote(
                model.pricing, (m["content"] for m in messages), params.max_tokens
            ),
            job_id=spec.job_id,
            in_ledger=True,
            also=store_job,
        )
        created_at = created[0]
        gateway.background.enqueue(spec.job_id)
    else:
        created_at = await gateway.background.submit(spec, stored)
    return json_response(
        {
            "id": spec.job_id,
            "object": "job",
            "status": "queued",
            "model": model_id,
            "created": int(created_at.timestamp()),
        },
        status_code=202,
    )


@router.get("/v1/jobs/{job_id}", summary="Get a job's status and result", response_model=None)
async def get_job(job_id: str, principal: CurrentPrincipal, gateway: GatewayDep) -> Response:
    async with gateway.engine.connect() as conn:
        row = (
            await conn.execute(
                select(jobs).where(jobs.c.id == job_id, jobs.c.account_id == principal.account_id)
            )
        ).first()
        if row is None:
            # Another account's job is reported exactly like a missing one.
            raise NotFound(f"No job with id '{job_id}'.", param="job_id")
        attempts = (
            await conn.execute(
                select(job_attempts)
                .where(job_attempts.c.job_id == job_id)
                .order_by(job_attempts.c.attempt)
            )
        ).all()
    result = None
    if row.status == "completed":
        result = {
            "output": row.output,
            "finish_reason": row.finish_reason,
            "usage": {
                "prompt_tokens": row.prompt_tokens,
                "completion_tokens": row.completion_tokens,
                "total_tokens": (row.prompt_tokens or 0) + (row.completion_tokens or 0),
            },
        }
    error = None
    if row.status == "failed":
        error = {"code": row.error_code, "message": row.error_message}
    return json_response(
        {
            "id": row.id,
            "object": "job",
            "kind": row.kind,
            "status": row.status,
            "model": row.model,
            "created": int(as_utc(row.created_at).timestamp()),
            "started_at": iso(row.started_at),
            "completed_at": iso(row.finished_at),
            "device_id": row.device_id,
            "latency_ms": row.latency_ms,
            "result": result,
            "error": error,
            "attempts": [
                {
                    "attempt": a.attempt,
                    "device_id": a.device_id,
                    "outcome": a.outcome,
                    "error_code": a.error_code,
                    "first_token_ms": a.first_token_ms,
                    "duration_ms": a.duration_ms,
                }
                for a in attempts
            ],
        }
    )
