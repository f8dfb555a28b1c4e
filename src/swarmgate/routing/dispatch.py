"""Running one request on devices: pick, send, watch, and fail over.

A request becomes a job; each try on one device is an attempt. Before anything has
reached the client, a failed, timed-out or vanished device costs only a retry on a
different device (linear backoff, bounded count, all inside a time budget). Once a
streamed token has reached the client the answer is not silently restarted: the
stream ends with ``StreamInterrupted``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime

import orjson

from swarmgate.errors import (
    AllAttemptsFailed,
    DeviceGone,
    DevicesBusy,
    DeviceTimeout,
    ModelWarming,
    StreamInterrupted,
    SwarmgateError,
)
from swarmgate.protocol import ChatMessage, Delta, Done, JobError, SamplingParams
from swarmgate.routing.registry import AttemptEvent, DeviceConnection, DeviceLost, DeviceRegistry
from swarmgate.routing.states import JobState, check_job_transition

log = logging.getLogger("swarmgate.dispatch")


# Error codes with which a healthy node declines a job (paused, draining, full): the job
# goes elsewhere, but the device is not put in a failure cooldown for it.
REFUSAL_CODES = frozenset({"DEVICE_PAUSED", "NODE_BUSY", "NODE_STOPPING"})


@dataclass(frozen=True, slots=True)
class DispatchPolicy:
    max_retries: int = 5
    retry_backoff_s: float = 0.1
    failover_budget_s: float = 15.0
    queue_wait_s: float = 2.0
    first_token_timeout_s: float = 10.0
    token_stall_timeout_s: float = 30.0


@dataclass(frozen=True, slots=True)
class JobSpec:
    job_id: str
    account_id: str
    key_id: str | None
    kind: str
    model: str
    messages: tuple[ChatMessage, ...]
    params: SamplingParams
    stream: bool


@dataclass(slots=True)
class AttemptRecord:
    attempt: int
    device_id: str
    outcome: str  # succeeded | failed | refused | timeout | gone | cancelled | interrupted
    error_code: str | None
    started_at: datetime
    first_token_ms: int | None
    duration_ms: int


@dataclass(slots=True)
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class _AttemptFailed(Exception):
    def __init__(self, outcome: str, code: str, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.code = code


@dataclass
class Execution:
    """One job's run across attempts. Not reusable."""

    spec: JobSpec
    registry: DeviceRegistry
    policy: DispatchPolicy
    state: JobState = JobState.PENDING
    attempts: list[AttemptRecord] = field(default_factory=list)
    device: DeviceConnection | None = None
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    finished_at: float | None = None
    error: SwarmgateError | None = None
    completion: Completion | None = None

    def _move(self, target: JobState) -> None:
        check_job_transition(self.state, target)
        self.state = target

    @property
    def latency_ms(self) -> int:
        end = self.finished_at if self.finished_at is not None else time.monotonic()
        return int((end - self.started) * 1000)

    @property
    def ttft_ms(self) -> int | None:
        if self.first_token_at is None:
            return None
        return int((self.first_token_at - self.started) * 1000)

    # -- the failover loop -------------------------------------------------------------
    async def _devices(self) -> AsyncGenerator[tuple[int, DeviceConnection], None]:
        """Yields (attempt number, device) until the retry count or time budget runs out."""
        policy = self.policy
        deadline = self.started + policy.failover_budget_s
        tried: set[str] = set()
        for number in range(1, policy.max_retries + 2):
            if number > 1:
                backoff = policy.retry_backoff_s * (number - 1)
                if time.monotonic() + backoff >= deadline:
                    return
                await asyncio.sleep(backoff)
            wait_s = max(0.0, min(policy.queue_wait_s, deadline - time.monotonic()))
            try:
                device = await self.registry.reserve(self.spec.model, tried, wait_s)
            except ModelWarming:
                if number == 1:
                    raise
                return  # every device of the model went away after a failure
            if device is None:
                return
            tried.add(device.device_id)
            yield number, device

    def _final_error(self) -> SwarmgateError:
        tries = len(self.attempts)
        if tries and all(a.outcome == "refused" for a in self.attempts):
            return DevicesBusy(
                f"Every device able to serve {self.spec.model!r} declined the job "
                "(paused or shutting down). Retry shortly.",
                retry_after=1,
            )
        if tries and all(a.outcome == "timeout" for a in self.attempts):
            return DeviceTimeout(
                f"The device did not answer in time ({tries} attempt(s)). You were not charged."
            )
        return AllAttemptsFailed(
            f"All {tries} attempt(s) on devices failed. You were not charged.",
            retry_after=1,
        )

    async def complete(self) -> Completion:
        """Runs a non-streamed job to the end; any failure before the end fails over."""
        self._move(JobState.RUNNING)
        try:
            async with aclosing(self._devices()) as devices:
                async for number, device in devices:
                    parts: list[str] = []
                    try:
                        async with aclosing(self._attempt(number, device)) as events:
                            async for event in events:
                                if isinstance(event, Delta):
                                    parts.append(event.text)
                                else:
                                    text = event.text if event.text is not None else "".join(parts)
                                    return self._succeed(device, event, text)
                    except _AttemptFailed:
                        continue
            raise self._final_error()
        except SwarmgateError as exc:
            self._fail(exc)
            raise
        except asyncio.CancelledError:
            self._cancel()
            raise

    async def stream(self) -> AsyncGenerator[Delta | Done, None]:
        """Yields the answer's deltas, then its Done. Fails over until the first delta is out."""
        self._move(JobState.RUNNING)
        delivered = False
        try:
            async with aclosing(self._devices()) as devices:
                async for number, device in devices:
                    try:
                        async with aclosing(self._attempt(number, device)) as events:
                            async for event in events:
                                if isinstance(event, Delta):
                                    delivered = True
                                    yield event
                                    continue
                                text = event.text or ""
                                if text and not delivered:
                                    # A device that ignored stream=True still gets its text out.
                                    delivered = True
                                    yield Delta(type="delta", job_id=event.job_id, text=text)
                                self._succeed(device, event, None)
                                yield event
                                return
                    except _AttemptFailed as failure:
                        if delivered:
                            self.attempts[-1].outcome = "interrupted"
                            raise StreamInterrupted(
                                "The device serving this stream failed after part of the answer "
                                f"was sent ({failure.code}). The answer is incomplete."
                            ) from failure
                        continue
            raise self._final_error()
        except SwarmgateError as exc:
            self._fail(exc)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            self._cancel()
            raise

    # -- one attempt --------------------------------------------------------------------
    async def _attempt(
        self, number: int, device: DeviceConnection
    ) -> AsyncGenerator[Delta | Done, None]:
        spec = self.spec
        attempt_id = f"{spec.job_id}.{number}"
        channel: asyncio.Queue[AttemptEvent] = asyncio.Queue()
        device.occupy(attempt_id, channel)
        self.device = device
        started = time.monotonic()
        first_at: float | None = None
        outcome, code = "cancelled", None
        record = AttemptRecord(
            attempt=number,
            device_id=device.device_id,
            outcome="running",
            error_code=None,
            started_at=datetime.now(UTC),
            first_token_ms=None,
            duration_ms=0,
        )
        self.attempts.append(record)
        try:
            try:
                device.send(_job_frame(spec, attempt_id))
            except DeviceGone as exc:
                raise _AttemptFailed("gone", "DEVICE_GONE", str(exc)) from exc
            timeout = self.policy.first_token_timeout_s
            while True:
                try:
                    async with asyncio.timeout(timeout):
                        event = await channel.get()
                except TimeoutError:
                    _send_cancel(device, attempt_id)
                    raise _AttemptFailed(
                        "timeout", "REQUEST_TIMEOUT", "device did not answer in time"
                    ) from None
                if first_at is None:
                    first_at = time.monotonic()
                    if self.first_token_at is None:
                        self.first_token_at = first_at
                    timeout = self.policy.token_stall_timeout_s
                if isinstance(event, Delta):
                    yield event
                elif isinstance(event, Done):
                    outcome = "succeeded"
                    device.observe_success(
                        (first_at - started) * 1000,
                        event.usage.completion_tokens,
                        time.monotonic() - first_at,
                    )
                    yield event
                    return
                elif isinstance(event, JobError):
                    outcome = "refused" if event.code in REFUSAL_CODES else "failed"
                    raise _AttemptFailed(outcome, event.code, event.message)
                elif isinstance(event, DeviceLost):
                    raise _AttemptFailed("gone", "DEVICE_GONE", event.reason)
        except _AttemptFailed as failure:
            outcome, code = failure.outcome, failure.code
            if outcome != "refused":  # a device that declines a job has not failed it
                device.observe_failure(time.monotonic())
            log.info(
                "attempt failed",
                extra={
                    "job_id": spec.job_id,
                    "attempt": number,
                    "device_id": device.device_id,
                    "outcome": outcome,
                    "code": code,
                },
            )
            raise
        except (asyncio.CancelledError, GeneratorExit):
            if outcome != "succeeded":
                _send_cancel(device, attempt_id)
            raise
        finally:
            if device.vacate(attempt_id):
                self.registry.slot_freed(device)
            if record.outcome == "running":  # "interrupted" may already be set by stream()
                record.outcome = outcome
            record.error_code = code
            record.first_token_ms = None if first_at is None else int((first_at - started) * 1000)
            record.duration_ms = int((time.monotonic() - started) * 1000)

    # -- endings ------------------------------------------------------------------------
    def _succeed(self, device: DeviceConnection, done: Done, text: str | None) -> Completion:
        self.finished_at = time.monotonic()
        self._move(JobState.SUCCEEDED)
        self.completion = Completion(
            text=text or "",
            finish_reason=done.finish_reason,
            prompt_tokens=done.usage.prompt_tokens,
            completion_tokens=done.usage.completion_tokens,
        )
        self.device = device
        return self.completion

    def _fail(self, error: SwarmgateError) -> None:
        if not self.state.finished:
            self.finished_at = time.monotonic()
            self.error = error
            self._move(JobState.FAILED)

    def _cancel(self) -> None:
        if not self.state.finished:
            self.finished_at = time.monotonic()
            self._move(JobState.CANCELLED)


def _job_frame(spec: JobSpec, attempt_id: str) -> str:
    return orjson.dumps(
        {
            "type": "job",
            "job_id": attempt_id,
            "model": spec.model,
            "messages": [{"role": m.role, "content": m.content} for m in spec.messages],
            "params": spec.params.model_dump(),
            "stream": spec.stream,
        }
    ).decode()


def _send_cancel(device: DeviceConnection, attempt_id: str) -> None:
    with suppress(DeviceGone):
        device.send(orjson.dumps({"type": "cancel", "job_id": attempt_id}).decode())
