"""Running a job for an HTTP request: cancellation on disconnect, SSE framing, recording."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.requests import Request

from swarmgate.accounts.keys import Principal
from swarmgate.accounts.limits import Admission
from swarmgate.api.schemas import RoutingFields
from swarmgate.api.streaming import PacedStreamingResponse
from swarmgate.billing.pricing import max_cost_micros
from swarmgate.billing.service import BilledPart, Charge, RequestHold, prompt_token_bound
from swarmgate.catalog import FREE, CatalogModel, Pricing
from swarmgate.errors import (
    CloudUnavailable,
    Forbidden,
    ModelNotFound,
    ModelWarming,
    RequestError,
    RoutingError,
    SwarmgateError,
)
from swarmgate.gateway import Gateway
from swarmgate.memory.service import Runner
from swarmgate.protocol import ChatMessage, Delta, Done, SamplingParams
from swarmgate.routing.choice import ModelPool, Route
from swarmgate.routing.dispatch import Completion, Execution, JobSpec

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE_FRAME = b"data: [DONE]\n\n"


# Job ids: a random part per process and a counter, 24 hex digits after the kind's prefix.
# Unique across restarts and gateways (48 random bits each) without a syscall per request;
# a job id grants nothing by itself (every lookup is scoped to the caller's account).
_JOB_ID_PREFIX = secrets.token_hex(6)
_JOB_COUNTER = itertools.count(1)


def new_job_id(prefix: str) -> str:
    return f"{prefix}{_JOB_ID_PREFIX}{next(_JOB_COUNTER):012x}"


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def swarmgate_info(execution: Execution, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    info: dict[str, Any] = {
        "inference_type": execution.inference_type,
        "device_id": execution.device.device_id if execution.device else None,
        "model": execution.model,
        "attempts": len(execution.attempts),
        "latency_ms": execution.latency_ms,
        "ttft_ms": execution.ttft_ms,
    }
    run = execution.cloud_run
    if execution.inference_type == "cloud" and run is not None:
        info["upstream"] = run.upstream
        info["byok"] = run.byok
    if execution.parts:
        info["continued"] = [
            {"device_id": part.device_id, "completion_tokens": part.completion_tokens}
            for part in execution.parts
        ]
    if extra:
        info.update(extra)
    return info


@dataclass(slots=True)
class Admitted:
    """A request let in: what it took from its key's rate limits and its credit hold."""

    admission: Admission
    hold: RequestHold | None
    # The job as admitted: its route kept to devices within what the hold covers.
    spec: JobSpec


AUTO_MODEL = "auto"


def build_route(
    gateway: Gateway,
    body: RoutingFields,
    model_id: str,
    principal: Principal,
    messages: Iterable[ChatMessage],
    max_tokens: int,
) -> Route:
    """The request's routing controls, checked against the catalog and the key.

    ``model_id`` is a catalog id or ``auto`` (every model a device serves now competes,
    scored by the tier). Fallback models must exist and be allowed for the key.
    """
    settings = principal.settings
    if model_id == AUTO_MODEL:
        models = tuple(m for m in gateway.registry.served_models() if settings.allows(m))
        if not models:
            raise ModelWarming(
                "No device serves any model this key may use right now. Retry later.",
                retry_after=gateway.settings.warming_retry_after_s,
            )
    else:
        ordered = [model_id]
        for index, fallback in enumerate(body.fallback_models or ()):
            if gateway.catalog.get(fallback) is None:
                raise ModelNotFound(
                    f"The fallback model '{fallback}' does not exist. GET /v1/models lists "
                    "the models.",
                    param=f"fallback_models[{index}]",
                )
            if fallback not in ordered:
                ordered.append(fallback)
        for model in ordered:
            if not settings.allows(model):
                raise Forbidden(
                    f"This API key may not use the model '{model}'.",
                    param="model" if model == model_id else "fallback_models",
                    code="MODEL_NOT_ALLOWED",
                )
        models = tuple(ordered)
    price = body.max_price
    return Route(
        models=models,
        tier=body.tier,
        any_model=model_id == AUTO_MODEL,
        trusted_only=body.trusted_only,
        verified_only=body.verified_only,
        max_latency_ms=body.max_latency_ms,
        allow=frozenset(body.allow_hosters or ()),
        deny=frozenset(body.deny_hosters or ()),
        max_price=None
        if price is None
        else Pricing(
            input_per_1m_micros=price.input_per_1m_micros,
            output_per_1m_micros=price.output_per_1m_micros,
        ),
        prompt_tokens=prompt_token_bound(message.content for message in messages),
        max_tokens=max_tokens,
    )


async def admit(gateway: Gateway, principal: Principal, spec: JobSpec) -> Admitted:
    """The checks before a job runs, cheapest first: model allowed, a device able to take
    it (fail fast), rate limits, credit.

    Raises 403, 404, 503, 429 or 402 with nothing taken; otherwise the caller must end the
    returned admission with ``settle`` (the job completed) or ``release`` (it did not).
    The hold covers the dearest device the request may land on; the job is then kept
    to devices within that price (``spec.route`` is capped).
    """
    route = spec.routing
    if route.models == (spec.model,) and not principal.settings.allows(spec.model):
        raise Forbidden(
            f"This API key may not use the model '{spec.model}'.",
            param="model",
            code="MODEL_NOT_ALLOWED",
        )
    entry = gateway.catalog.get(spec.model)
    tier = entry.tier if entry is not None else "p2p"
    cloud = entry is not None and tier != "p2p" and gateway.upstreams.serves(entry)
    if tier == "cloud" and spec.privacy_mode:
        raise RequestError(
            f"'{spec.model}' runs only on cloud upstreams, and privacy_mode forbids them. "
            "Choose a p2p or hybrid model.",
            param="privacy_mode",
            code="PRIVACY_MODE_FORBIDS_CLOUD",
        )
    if tier == "cloud" and not cloud:
        raise CloudUnavailable(f"No cloud upstream is configured for '{spec.model}'.")
    pools: list[ModelPool] = []
    if tier != "cloud":
        try:
            pools = gateway.registry.check(route)
        except RoutingError as exc:
            if not cloud or spec.privacy_mode:
                if cloud:
                    exc.message += " (privacy_mode: the cloud upstream was not used)"
                raise
    prompt_bound = route.prompt_tokens or prompt_token_bound(m.content for m in spec.messages)
    max_tokens = spec.params.max_tokens
    admission = await gateway.limiter.admit(
        principal.key_id, principal.settings, prompt_bound + max_tokens
    )
    if not gateway.billing.enabled:
        return Admitted(admission, None, spec)
    caps: dict[str, Pricing] = {}
    amount, pricing, model = hold_bound(spec, entry, cloud, pools, prompt_bound, caps)
    if spec.route is route:
        # The request's own route (``build_route`` makes one per request): capped in
        # place, once, before the job is dispatched; cheaper than copying it and the spec.
        route.price_caps = caps
    else:
        spec = spec.with_route(route.capped_each(caps))
    tracing = gateway.tracing
    traced = None if tracing is None else tracing.billing("hold", spec.job_id)
    billing = gateway.billing
    try:
        hold = billing.hold_now(principal, model, pricing, amount, spec.job_id)
        if hold is None:
            hold = await billing.hold(
                principal,
                model=model,
                pricing=pricing,
                amount_micros=amount,
                job_id=spec.job_id,
            )
    except BaseException as exc:
        gateway.limiter.finish(admission, 0)
        if traced is not None:
            traced.end(exc)
        raise
    if traced is not None:
        traced.end()
    return Admitted(admission, hold, spec)


def hold_bound(
    spec: JobSpec,
    entry: CatalogModel | None,
    cloud: bool,
    pools: list[ModelPool],
    prompt_bound: int,
    caps: dict[str, Pricing] | None = None,
) -> tuple[int, Pricing, str]:
    """The most ``spec`` may cost — (amount, pricing, model) — at the dearest price among
    its candidates (within the request's own max_price), and the cloud's where an
    upstream may serve it; times the job's rate. ``caps`` gets each pool's price the
    hold covers (model → price, before the rate)."""
    max_tokens = spec.params.max_tokens
    amount, pricing, model = 0, FREE, spec.model
    if cloud and entry is not None and not spec.privacy_mode:
        pricing = at_rate(entry.pricing, spec.rate_bps)
        amount = max_cost_micros(pricing, prompt_bound, max_tokens)
    max_price = spec.routing.max_price
    for pool in pools:
        cap = pool.price_ceiling(max_price)
        if caps is not None:
            caps[pool.model] = cap
        ceiling = at_rate(cap, spec.rate_bps)
        cost = max_cost_micros(ceiling, prompt_bound, max_tokens)
        if cost >= amount:
            amount, pricing, model = cost, ceiling, pool.model
    return amount, pricing, model


def at_rate(pricing: Pricing, rate_bps: int) -> Pricing:
    """``pricing`` times ``rate_bps`` / 10,000, rounded down to whole micro-dollars."""
    if rate_bps == 10_000:
        return pricing
    return Pricing(
        input_per_1m_micros=pricing.input_per_1m_micros * rate_bps // 10_000,
        output_per_1m_micros=pricing.output_per_1m_micros * rate_bps // 10_000,
    )


async def settle(gateway: Gateway, admitted: Admitted, execution: Execution) -> int:
    """Charges a completed job at the serving devices' prices (times the job's rate); the
    answer may leave only after this returns. What was charged, in micro-dollars."""
    completion = execution.completion
    assert completion is not None, "settle() needs a completed job"
    gateway.limiter.finish(
        admitted.admission, completion.prompt_tokens + completion.completion_tokens
    )
    if admitted.hold is None:
        return 0
    rate = execution.spec.rate_bps
    tracing = gateway.tracing
    traced = None if tracing is None else tracing.billing("settle", execution.spec.job_id)
    billing = gateway.billing
    charge: Charge | None
    try:
        if execution.parts:
            charge = await billing.settle_parts(
                admitted.hold,
                [
                    BilledPart(
                        device_id=part.device_id,
                        provider_account_id=part.account_id,
                        model=part.model,
                        pricing=at_rate(gateway.device_price(part.device_id, part.model), rate),
                        prompt_tokens=part.prompt_tokens,
                        completion_tokens=part.completion_tokens,
                    )
                    for part in execution.parts
                ],
            )
        else:
            if execution.inference_type == "cloud":
                # No provider: the platform pays the upstream.
                device_id = provider_account_id = None
                model = execution.spec.model
                run = execution.cloud_run
                price = gateway.cloud_price(model, byok=bool(run and run.byok))
            else:
                device = execution.device
                device_id = device.device_id if device else None
                provider_account_id = device.account_id if device else None
                model = execution.model or execution.spec.model
                price = gateway.device_price(device_id, model)
            pricing = at_rate(price, rate)
            # Positional, and without a coroutine where it can be: this runs on every request.
            charge = billing.settle_now(
                admitted.hold,
                completion.prompt_tokens,
                completion.completion_tokens,
                device_id,
                provider_account_id,
                model,
                pricing,
            )
            if charge is None:  # the general path, without trying the fast one again
                charge = await billing.settle_parts(
                    admitted.hold,
                    (
                        BilledPart(
                            device_id,
                            provider_account_id,
                            model,
                            pricing,
                            completion.prompt_tokens,
                            completion.completion_tokens,
                        ),
                    ),
                )
    except BaseException as exc:
        if traced is not None:
            traced.end(exc)
        raise
    if traced is not None:
        traced.end(charged_micros=charge.charged_micros)
    return charge.charged_micros


def release(gateway: Gateway, admitted: Admitted) -> None:
    """Ends an admission without a charge (failed, timed out, cancelled); idempotent."""
    gateway.limiter.finish(admitted.admission, 0)
    if admitted.hold is not None:
        gateway.billing.void(admitted.hold)


# Most device answers arrive sooner than this; only slower jobs pay for a watcher task.
DISCONNECT_WATCH_AFTER_S = 0.02


async def complete_or_cancel(request: Request, execution: Execution) -> Completion:
    """Runs a non-streamed job; if the client goes away first, the job is cancelled."""
    main = asyncio.current_task()
    assert main is not None
    loop = asyncio.get_running_loop()
    disconnected = False
    watcher: asyncio.Task[None] | None = None

    async def watch() -> None:
        nonlocal disconnected
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                disconnected = True
                main.cancel()
                return

    def start_watching() -> None:
        nonlocal watcher
        watcher = loop.create_task(watch())

    timer = loop.call_later(DISCONNECT_WATCH_AFTER_S, start_watching)
    try:
        return await execution.complete()
    except asyncio.CancelledError:
        if disconnected:
            raise ClientGone from None
        raise
    finally:
        timer.cancel()
        if watcher is not None:
            watcher.cancel()


class ClientGone(Exception):
    pass


async def open_stream(
    execution: Execution,
) -> tuple[Delta | Done, AsyncGenerator[Delta | Done, None]]:
    """Waits for the first event, with failover, before any byte of the response is sent,
    so that every failure up to there is a plain HTTP error."""
    events = execution.stream()
    try:
        first = await anext(events)
    except BaseException:
        await events.aclose()
        raise
    return first, events


def stream_response(
    gateway: Gateway,
    execution: Execution,
    first: Delta | Done,
    events: AsyncGenerator[Delta | Done, None],
    created_at: datetime,
    frames: Callable[[Delta | Done | None], list[bytes]],
    admitted: Admitted,
    on_done: Callable[[str], Awaitable[None]] | None = None,
    headers: dict[str, str] | None = None,
) -> PacedStreamingResponse:
    """SSE body: ``frames(event)`` renders each event, ``frames(None)`` the closing frames.

    The job is charged when its last event arrives, before the closing frames (finish
    reason, usage, ``[DONE]``) are sent; a stream that ends any other way is not charged.
    ``on_done(text)`` (conversation memory) runs with the whole answer just before the
    charge; if it raises, the stream ends with that error, uncharged.
    """
    parts: list[str] | None = [] if on_done is not None else None

    async def body() -> AsyncIterator[bytes]:
        try:
            event: Delta | Done | None = first
            while event is not None:
                if parts is not None and isinstance(event, Delta):
                    parts.append(event.text)
                if isinstance(event, Done):
                    if on_done is not None and parts is not None:
                        await on_done("".join(parts))
                    await settle(gateway, admitted, execution)
                for frame in frames(event):
                    yield frame
                if isinstance(event, Done):
                    break
                event = await anext(events, None)
            for frame in frames(None):
                yield frame
        except SwarmgateError as exc:
            yield sse(exc.to_dict())
        finally:
            release(gateway, admitted)
            with contextlib.suppress(Exception):
                await events.aclose()
            gateway.job_log.record(execution, created_at)

    return PacedStreamingResponse(
        body(),
        stall_timeout_s=gateway.settings.client_stall_timeout_s,
        media_type="text/event-stream",
        headers=SSE_HEADERS if headers is None else {**SSE_HEADERS, **headers},
    )


def now_utc() -> datetime:
    return datetime.now(UTC)


async def run_job(
    gateway: Gateway, principal: Principal, spec: JobSpec
) -> tuple[Execution, Completion, int]:
    """A whole job for work the gateway does on a key's behalf (memory upkeep,
    orchestration steps): admitted, run to completion, settled (what it cost, in
    micro-dollars), recorded. Raises the job's ``SwarmgateError``, uncharged."""
    created_at = now_utc()
    admitted = await admit(gateway, principal, spec)
    execution = gateway.execution(admitted.spec)
    try:
        completion = await execution.complete()
        cost = await settle(gateway, admitted, execution)
    finally:
        release(gateway, admitted)
        gateway.job_log.record(execution, created_at)
    return execution, completion, cost


def upkeep_runner(gateway: Gateway) -> Runner:
    """Runs the title and summary jobs of conversation memory (``memory.service.Runner``)
    like requests of the same key: admitted, charged, recorded; None when one fails."""
    log = logging.getLogger("swarmgate.memory")

    async def run(
        principal: Principal, model: str, messages: tuple[ChatMessage, ...], max_tokens: int
    ) -> tuple[str, str] | None:
        job_id = new_job_id("chatcmpl-")
        spec = JobSpec(
            job_id=job_id,
            account_id=principal.account_id,
            key_id=principal.key_id,
            kind="chat",
            model=model,
            messages=messages,
            params=SamplingParams(max_tokens=max_tokens, temperature=0.0, top_p=1.0),
            stream=False,
        )
        try:
            _execution, completion, _cost = await run_job(gateway, principal, spec)
        except SwarmgateError as exc:
            log.warning("a conversation upkeep job failed: %s", exc.code)
            return None
        return completion.text, job_id

    return run
