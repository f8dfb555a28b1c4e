"""``POST /v1/chat/completions``: the OpenAI chat API, answered by devices."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from swarmgate.accounts.keys import Principal
from swarmgate.api.deps import CurrentPrincipal, GatewayDep, read_body
from swarmgate.api.orchestration import orchestrate, orchestration_for
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
from swarmgate.api.schemas import ChatCompletionRequest, parse_body
from swarmgate.catalog import CatalogModel
from swarmgate.errors import ModelNotFound, RequestError
from swarmgate.gateway import Gateway
from swarmgate.memory.service import MemoryTurn
from swarmgate.protocol import ChatMessage, Delta, Done, SamplingParams
from swarmgate.routing.dispatch import Execution, JobSpec

router = APIRouter(tags=["chat"])

DEFAULT_MAX_TOKENS = 256


def resolve_model(gateway: Gateway, model_id: str) -> CatalogModel:
    model = gateway.catalog.get(model_id)
    if model is None:
        raise ModelNotFound(
            f"The model '{model_id}' does not exist. GET /v1/models lists the models.",
            param="model",
        )
    return model


def check_max_tokens(gateway: Gateway, model_id: str, max_tokens: int) -> str:
    """The model id (a catalog id or ``auto``) once ``max_tokens`` fits it; else a 400/404."""
    if model_id == AUTO_MODEL:
        limit = gateway.settings.max_tokens_limit
    else:
        model = resolve_model(gateway, model_id)
        limit = min(gateway.settings.max_tokens_limit, model.context_length)
    if max_tokens > limit:
        raise RequestError(
            f"max_tokens is {max_tokens}; '{model_id}' allows at most {limit}.",
            param="max_tokens",
        )
    return model_id


def body_messages(body: ChatCompletionRequest) -> tuple[ChatMessage, ...]:
    return tuple(ChatMessage(role=m.chat_role, content=m.text) for m in body.messages)


def chat_spec(
    gateway: Gateway,
    body: ChatCompletionRequest,
    principal: Principal,
    job_id: str,
    messages: tuple[ChatMessage, ...] | None = None,
) -> JobSpec:
    """The job for a chat request; ``messages`` replaces the body's (conversation memory)."""
    max_tokens = body.requested_max_tokens(DEFAULT_MAX_TOKENS)
    model_id = check_max_tokens(gateway, body.model, max_tokens)
    if messages is None:
        messages = body_messages(body)
    return JobSpec(
        job_id=job_id,
        account_id=principal.account_id,
        key_id=principal.key_id,
        kind="chat",
        model=model_id,
        route=build_route(gateway, body, model_id, principal, messages, max_tokens),
        continuation=body.stream_continuation,
        privacy_mode=body.privacy_mode,
        messages=messages,
        params=SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=body.stop_list(),
            seed=body.seed,
        ),
        stream=body.stream,
    )


CHAT_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": ChatCompletionRequest.model_json_schema()}},
    }
}


@router.post(
    "/v1/chat/completions",
    openapi_extra=CHAT_OPENAPI,
    summary="Create a chat completion (OpenAI-compatible)",
    response_model=None,
)
async def create_chat_completion(
    request: Request, principal: CurrentPrincipal, gateway: GatewayDep
) -> Response:
    return await chat_completions(request, gateway, principal)


def memory_models(
    gateway: Gateway, body: ChatCompletionRequest, model_id: str, principal: Principal
) -> tuple[str, ...]:
    """The models a request may run on, for sizing its conversation's prompt."""
    if model_id == AUTO_MODEL:
        return tuple(m for m in gateway.registry.served_models() if principal.settings.allows(m))
    extra = (m for m in body.fallback_models or () if gateway.catalog.get(m) is not None)
    return (model_id, *extra)


async def remember(
    request: Request, gateway: Gateway, body: ChatCompletionRequest, principal: Principal
) -> MemoryTurn | None:
    """The request's conversation turn, or None for a stateless request."""
    conversation_id = await gateway.memory.conversation_for(
        principal, body.conversation_id, request.headers.get("x-session-id")
    )
    if conversation_id is None:
        return None
    max_tokens = body.requested_max_tokens(DEFAULT_MAX_TOKENS)
    model_id = check_max_tokens(gateway, body.model, max_tokens)
    models = memory_models(gateway, body, model_id, principal)
    return await gateway.memory.prepare(
        principal,
        conversation_id,
        [(m.chat_role, m.text) for m in body.messages],
        models=models or (model_id,),
        max_tokens=max_tokens,
    )


async def chat_completions(request: Request, gateway: Gateway, principal: Principal) -> Response:
    """The endpoint itself; served from the hot path (``api/hotpath.py``) in the gateway."""
    raw = await read_body(request, gateway.settings.max_body_bytes)
    body = parse_body(ChatCompletionRequest, raw)
    job_id = new_job_id("chatcmpl-")
    turn = None
    if body.conversation_id is not None or principal.settings.auto_memory:
        turn = await remember(request, gateway, body, principal)
    if body.orchestration is not None or principal.settings.auto_orchestration:
        orchestration = orchestration_for(body, principal)
        if orchestration is not None:
            messages = turn.messages if turn else body_messages(body)
            return await orchestrate(
                request, gateway, principal, body, orchestration, job_id, messages, turn
            )
    spec = chat_spec(gateway, body, principal, job_id, turn.messages if turn else None)
    admitted = await admit(gateway, principal, spec)
    spec = admitted.spec
    execution = gateway.execution(spec)
    created_at = now_utc()
    created = int(created_at.timestamp())
    extra = {"conversation_id": turn.conversation_id} if turn is not None else None
    headers = {"X-Conversation-ID": turn.conversation_id} if turn is not None else None

    if not body.stream:
        try:
            completion = await complete_or_cancel(request, execution)
            if turn is not None:
                await gateway.memory.commit(
                    turn, completion.text, job_id=job_id, model=execution.model or spec.model
                )
            await settle(gateway, admitted, execution)
        except ClientGone:
            return Response(status_code=499)
        finally:
            release(gateway, admitted)
            gateway.job_log.record(execution, created_at)
        return json_response(
            {
                "id": job_id,
                "object": "chat.completion",
                "created": created,
                "model": execution.model or spec.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": completion.text},
                        "logprobs": None,
                        "finish_reason": completion.finish_reason,
                    }
                ],
                "usage": {
                    "prompt_tokens": completion.prompt_tokens,
                    "completion_tokens": completion.completion_tokens,
                    "total_tokens": completion.prompt_tokens + completion.completion_tokens,
                },
                "system_fingerprint": None,
                "swarmgate": swarmgate_info(execution, extra),
            },
            headers=headers,
        )

    try:
        first, events = await open_stream(execution)
    except BaseException:
        release(gateway, admitted)
        gateway.job_log.record(execution, created_at)
        raise
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    frames = _chunk_renderer(
        job_id, created, execution.model or spec.model, execution, include_usage, extra
    )
    on_done = None
    if turn is not None:
        remembered = turn

        async def on_done(text: str) -> None:
            await gateway.memory.commit(
                remembered, text, job_id=job_id, model=execution.model or spec.model
            )

    return stream_response(
        gateway, execution, first, events, created_at, frames, admitted, on_done, headers
    )


def _chunk_renderer(
    job_id: str,
    created: int,
    model: str,
    execution: Execution,
    include_usage: bool,
    extra: dict[str, Any] | None = None,
) -> Any:
    state = {"role_sent": False, "finish_reason": None}

    def chunk(delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "id": job_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": None,
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ],
        }
        if include_usage:
            payload["usage"] = None
        return payload

    def frames(event: Delta | Done | None) -> list[bytes]:
        out: list[bytes] = []
        if event is None:
            return [DONE_FRAME]
        if isinstance(event, Delta):
            delta: dict[str, Any] = {"content": event.text}
            if not state["role_sent"]:
                delta = {"role": "assistant", "content": event.text}
                state["role_sent"] = True
            out.append(sse(chunk(delta, None)))
            return out
        # Done: the closing chunk carries finish_reason, then usage when asked for.
        if not state["role_sent"]:
            out.append(sse(chunk({"role": "assistant", "content": ""}, None)))
            state["role_sent"] = True
        closing = chunk({}, event.finish_reason)
        closing["swarmgate"] = swarmgate_info(execution, extra)
        out.append(sse(closing))
        if include_usage:
            usage = event.usage
            out.append(
                sse(
                    {
                        "id": job_id,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "system_fingerprint": None,
                        "choices": [],
                        "usage": {
                            "prompt_tokens": usage.prompt_tokens,
                            "completion_tokens": usage.completion_tokens,
                            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
                        },
                        "swarmgate": swarmgate_info(execution, extra),
                    }
                )
            )
        return out

    return frames
