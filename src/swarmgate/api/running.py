"""Running a job for an HTTP request: cancellation on disconnect, SSE framing, recording."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import StreamingResponse

from swarmgate.errors import SwarmgateError
from swarmgate.gateway import Gateway
from swarmgate.protocol import Delta, Done
from swarmgate.routing.dispatch import Completion, Execution

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
) -> StreamingResponse:
    """SSE body: ``frames(event)`` renders each event, ``frames(None)`` the closing frames."""

    async def body() -> AsyncIterator[bytes]:
        try:
            for frame in frames(first):
                yield frame
            if not isinstance(first, Done):
                async for event in events:
                    for frame in frames(event):
                        yield frame
            for frame in frames(None):
                yield frame
        except SwarmgateError as exc:
            yield sse(exc.to_dict())
        finally:
            with contextlib.suppress(Exception):
                await events.aclose()
            gateway.job_log.record(execution, created_at)

    return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)


def now_utc() -> datetime:
    return datetime.now(UTC)
