"""Running a job for an HTTP request: cancellation on disconnect, SSE framing, recording."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import StreamingResponse

from swarmgate.accounts.keys import Principal
from swarmgate.accounts.limits import Admission
from swarmgate.billing.pricing import max_cost_micros
from swarmgate.billing.service import RequestHold, prompt_token_bound
from swarmgate.catalog import CatalogModel
from swarmgate.errors import Forbidden, SwarmgateError
from swarmgate.gateway import Gateway
from swarmgate.protocol import Delta, Done
from swarmgate.routing.dispatch import Completion, Execution, JobSpec

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE_FRAME = b"data: [DONE]\n\n"


def new_job_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def swarmgate_info(execution: Execution) -> dict[str, Any]:
    return {
        "inference_type": "p2p",
        "device_id": execution.device.device_id if execution.device else None,
        "attempts": len(execution.attempts),
        "latency_ms": execution.latency_ms,
        "ttft_ms": execution.ttft_ms,
    }


@dataclass(slots=True)
class Admitted:
    """A request let in: what it took from its key's rate limits and its credit hold."""

    admission: Admission
    hold: RequestHold | None


async def admit(
    gateway: Gateway, principal: Principal, spec: JobSpec, model: CatalogModel
) -> Admitted:
    """The checks before a job runs, cheapest first: model allowed, rate limits, credit.

    Raises 403, 429 or 402 with nothing taken; otherwise the caller must end the
    returned admission with ``settle`` (the job completed) or ``release`` (it did not).
    """
    if not principal.settings.allows(model.id):
        raise Forbidden(
            f"This API key may not use the model '{model.id}'.",
            param="model",
            code="MODEL_NOT_ALLOWED",
        )
    prompt_bound = prompt_token_bound(message.content for message in spec.messages)
    max_tokens = spec.params.max_tokens
    admission = gateway.limiter.admit(
        principal.key_id, principal.settings, prompt_bound + max_tokens
    )
    if not gateway.billing.enabled:
        return Admitted(admission, None)
    try:
        hold = await gateway.billing.hold(
            principal,
            model=model.id,
            pricing=model.pricing,
            amount_micros=max_cost_micros(model.pricing, prompt_bound, max_tokens),
            job_id=spec.job_id,
        )
    except BaseException:
        gateway.limiter.finish(admission, 0)
        raise
    return Admitted(admission, hold)


async def settle(gateway: Gateway, admitted: Admitted, execution: Execution) -> None:
    """Charges a completed job; the answer may leave only after this returns."""
    completion = execution.completion
    assert completion is not None, "settle() needs a completed job"
    gateway.limiter.finish(
        admitted.admission, completion.prompt_tokens + completion.completion_tokens
    )
    if admitted.hold is None:
        return
    device = execution.device
    await gateway.billing.settle(
        admitted.hold,
        prompt_tokens=completion.prompt_tokens,
        completion_tokens=completion.completion_tokens,
        device_id=device.device_id if device else None,
        provider_account_id=device.account_id if device else None,
    )


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
) -> StreamingResponse:
    """SSE body: ``frames(event)`` renders each event, ``frames(None)`` the closing frames.

    The job is charged when its last event arrives, before the closing frames (finish
    reason, usage, ``[DONE]``) are sent; a stream that ends any other way is not charged.
    """

    async def body() -> AsyncIterator[bytes]:
        try:
            event: Delta | Done | None = first
            while event is not None:
                if isinstance(event, Done):
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

    return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)


def now_utc() -> datetime:
    return datetime.now(UTC)
