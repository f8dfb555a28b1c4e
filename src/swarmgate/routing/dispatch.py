"""Running one request on devices: pick, send, watch, and fail over.

A request becomes a job; each try on one device is an attempt. Before anything has
reached the client, a failed, timed-out or vanished device costs only a retry on a
different device (linear backoff, bounded count, all inside a time budget).

Once streamed tokens have reached the client, the answer is never restarted. Instead
another device *continues* it: it gets the conversation plus the text sent so far as
the start of the assistant turn (``continue_final``) and generates the rest, which is
spliced onto the stream, so the client sees one unbroken answer. Each device is paid
for its part (``Execution.parts``). With ``continuation`` off, or nothing left to
continue with, the stream ends with ``StreamInterrupted``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import orjson

from swarmgate.catalog import CatalogModel
from swarmgate.errors import (
    AllAttemptsFailed,
    DeviceGone,
    DevicesBusy,
    DeviceTimeout,
    ModelWarming,
    RoutingError,
    StreamInterrupted,
    SwarmgateError,
)
from swarmgate.protocol import ChatMessage, Delta, Done, JobError, SamplingParams, Usage
from swarmgate.routing.choice import Route
from swarmgate.routing.registry import AttemptEvent, DeviceConnection, DeviceLost, DeviceRegistry
from swarmgate.routing.states import JobState, check_job_transition
from swarmgate.upstreams import CloudRun, KeyLookup, Upstreams

if TYPE_CHECKING:
    from swarmgate.tracing import JobTrace

log = logging.getLogger("swarmgate.dispatch")


# Error codes with which a healthy node declines a job (paused, draining, full): the job
# goes elsewhere, but the device is not put in a failure cooldown for it.
REFUSAL_CODES = frozenset(
    {"DEVICE_PAUSED", "NODE_BUSY", "NODE_STOPPING", "CONTINUATION_UNSUPPORTED"}
)


@dataclass(frozen=True, slots=True)
class DispatchPolicy:
    max_retries: int = 5
    retry_backoff_s: float = 0.1
    failover_budget_s: float = 15.0
    queue_wait_s: float = 2.0
    first_token_timeout_s: float = 10.0
    token_stall_timeout_s: float = 30.0


# Not frozen: one or two are built per request, and a frozen dataclass's ``__init__``
# (``object.__setattr__`` per field) costs four times a plain one's. Never mutated.
@dataclass(slots=True)
class JobSpec:
    job_id: str
    account_id: str
    key_id: str | None
    kind: str
    model: str
    messages: tuple[ChatMessage, ...]
    params: SamplingParams
    stream: bool
    # The routing controls; None: just the model, balanced.
    route: Route | None = None
    # Continue a stream on another device when its device fails mid-answer.
    continuation: bool = True
    # Internal jobs (canaries) are not billed and do not count as the device's work.
    internal: bool = False
    # Never a cloud upstream, even for a hybrid model.
    privacy_mode: bool = False
    # The price multiplier, in basis points (orchestrated steps: a configurable rate).
    rate_bps: int = 10_000

    def with_route(self, route: Route) -> JobSpec:
        """This job with another route (field by field: cheaper than ``replace``)."""
        return JobSpec(
            self.job_id,
            self.account_id,
            self.key_id,
            self.kind,
            self.model,
            self.messages,
            self.params,
            self.stream,
            route,
            self.continuation,
            self.internal,
            self.privacy_mode,
            self.rate_bps,
        )

    @property
    def routing(self) -> Route:
        if self.route is not None:
            return self.route
        return Route(models=(self.model,), max_tokens=self.params.max_tokens)


@dataclass(slots=True)
class Part:
    """What one device contributed to a continued answer, for paying it."""

    device_id: str
    account_id: str
    model: str
    prompt_tokens: int
    completion_tokens: int


class Observer:
    """Told of every attempt's outcome; the trust book overrides these to score devices."""

    def succeeded(
        self,
        device: DeviceConnection,
        model: str,
        ttft_ms: float | None,
        tokens: int,
        gen_s: float,
        total_s: float,
    ) -> None:
        device.profile.observe_success(model, ttft_ms, tokens, gen_s)

    def failed(self, device: DeviceConnection, model: str, outcome: str, now: float) -> None:
        if outcome in ("failed", "timeout", "gone", "interrupted"):
            device.profile.observe_failure(model, now)


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


@dataclass(frozen=True, slots=True)
class CloudPlan:
    """How a job may use cloud upstreams: only them (a cloud model), or after the devices
    (a hybrid model whose request allows the cloud)."""

    model: CatalogModel
    upstreams: Upstreams
    vault_key: KeyLookup
    only: bool
    fallback: bool


class _ToCloud(Exception):
    """Internal: a cloud-only job skips the device path."""


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
    observer: Observer = field(default_factory=Observer)
    # The model that served (a fallback model, or the pick for "auto").
    model: str | None = None
    # Devices that produced part of a continued answer, in order; empty otherwise.
    parts: list[Part] = field(default_factory=list)
    # The route in force: after the first delivered token, pinned to the serving model.
    _route: Route | None = None
    # Failover ends here; a continuation gets a fresh budget from the moment it is needed.
    _deadline: float = 0.0
    # Cloud upstreams for a cloud or hybrid model (None: devices only).
    cloud: CloudPlan | None = None
    cloud_run: CloudRun | None = None
    inference_type: str = "p2p"
    # This job's spans when tracing is on (swarmgate.tracing): told of each attempt and of
    # the job's ending, once its outcome is filled in. None costs one check each time.
    trace: JobTrace | None = None

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
    async def _devices(self) -> AsyncGenerator[tuple[int, DeviceConnection, str], None]:
        """Yields (attempt number, device, model) until the retry count or time budget
        runs out."""
        policy = self.policy
        self._deadline = self.started + policy.failover_budget_s
        tried: set[str] = set()
        for number in range(1, policy.max_retries + 2):
            if number > 1:
                backoff = policy.retry_backoff_s * (number - 1)
                if time.monotonic() + backoff >= self._deadline:
                    return
                await asyncio.sleep(backoff)
            wait_s = max(0.0, min(policy.queue_wait_s, self._deadline - time.monotonic()))
            route = self._route or self.spec.routing
            try:
                found = await self.registry.reserve(route, tried, wait_s)
            except ModelWarming:
                if number == 1:
                    raise
                return  # every device of the model went away after a failure
            if found is None:
                return
            device, model = found
            tried.add(device.device_id)
            yield number, device, model

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
        """Runs a non-streamed job to the end; any failure before the end fails over (to
        another device, then, for a hybrid model, to a cloud upstream)."""
        self._move(JobState.RUNNING)
        try:
            if self.cloud is not None and self.cloud.only:
                return await self._cloud_complete()
            try:
                return await self._complete_on_devices()
            except SwarmgateError as exc:
                if not self._falls_back(exc):
                    raise
                return await self._cloud_complete()
        except SwarmgateError as exc:
            self._fail(exc)
            raise
        except asyncio.CancelledError:
            self._cancel()
            raise

    async def _complete_on_devices(self) -> Completion:
        async with aclosing(self._devices()) as devices:
            async for number, device, model in devices:
                parts: list[str] = []
                try:
                    async with aclosing(self._attempt(number, device, model)) as events:
                        async for event in events:
                            if isinstance(event, Delta):
                                parts.append(event.text)
                            else:
                                text = event.text if event.text is not None else "".join(parts)
                                return self._succeed(device, model, event, text)
                except _AttemptFailed:
                    continue
        raise self._final_error()

    async def stream(self) -> AsyncGenerator[Delta | Done, None]:
        """Yields the answer's deltas, then its Done. Fails over until the first delta is
        out; after that, continues the answer on another device (see the module doc)."""
        self._move(JobState.RUNNING)
        sent: list[str] = []  # the text the client has, across devices
        sent_tokens = 0
        fallback = self.cloud is not None and self.cloud.only
        try:
            if fallback:
                raise _ToCloud
            async with aclosing(self._devices()) as devices:
                async for number, device, model in devices:
                    prefix = "".join(sent) if sent else None
                    part_tokens = 0
                    try:
                        attempt = self._attempt(number, device, model, prefix, sent_tokens)
                        async with aclosing(attempt) as events:
                            async for event in events:
                                if isinstance(event, Delta):
                                    if not sent:
                                        # Continuations stay on the model that started it.
                                        self._route = _pinned(self.spec.routing, model)
                                    sent.append(event.text)
                                    part_tokens += event.tokens
                                    yield event
                                    continue
                                text = event.text or ""
                                if text and part_tokens == 0:
                                    # A device that ignored stream=True still gets its text out.
                                    sent.append(text)
                                    yield Delta(type="delta", job_id=event.job_id, text=text)
                                if self.parts:
                                    event = self._joined(device, model, event)
                                self._succeed(device, model, event, None)
                                yield event
                                return
                    except _AttemptFailed as failure:
                        if not sent:
                            continue
                        if part_tokens:
                            self.attempts[-1].outcome = "interrupted"
                            self.parts.append(
                                Part(device.device_id, device.account_id, model, 0, part_tokens)
                            )
                        sent_tokens += part_tokens
                        if not self.spec.continuation or sent_tokens >= self.spec.params.max_tokens:
                            raise StreamInterrupted(
                                "The device serving this stream failed after part of the answer "
                                f"was sent ({failure.code}). The answer is incomplete."
                            ) from failure
                        self._deadline = time.monotonic() + self.policy.failover_budget_s
                        log.info(
                            "continuing a stream on another device",
                            extra={"job_id": self.spec.job_id, "attempt": number},
                        )
                        continue
            if sent:
                raise StreamInterrupted(
                    "The device serving this stream failed after part of the answer was sent, "
                    "and no other device could continue it. The answer is incomplete."
                )
            raise self._final_error()
        except SwarmgateError as exc:
            if sent and not isinstance(exc, StreamInterrupted):
                # No device could take the continuation (all busy, say): the answer stops.
                interrupted = StreamInterrupted(
                    "The device serving this stream failed after part of the answer was sent, "
                    f"and no other device could continue it ({exc.code}). The answer is "
                    "incomplete."
                )
                self._fail(interrupted)
                raise interrupted from exc
            if sent or not self._falls_back(exc):
                self._fail(exc)
                raise
            fallback = True
        except _ToCloud:
            pass
        except (asyncio.CancelledError, GeneratorExit):
            self._cancel()
            raise
        if not fallback:
            return
        try:
            async for event in self._cloud_events():
                yield event
        except SwarmgateError as exc:
            self._fail(exc)
            raise
        except (asyncio.CancelledError, GeneratorExit):
            self._cancel()
            raise

    # -- the cloud ----------------------------------------------------------------------
    def _falls_back(self, error: SwarmgateError) -> bool:
        """Whether a device-path failure goes on to a cloud upstream: a hybrid model, a
        request that allows the cloud, and no device able to serve it."""
        cloud = self.cloud
        if cloud is None or not cloud.fallback:
            return False
        return isinstance(error, RoutingError | AllAttemptsFailed | DeviceTimeout)

    async def _cloud_events(self) -> AsyncGenerator[Delta | Done, None]:
        cloud = self.cloud
        assert cloud is not None
        run = CloudRun(cloud.model, streamed=self.spec.stream)
        self.cloud_run = run
        started = datetime.now(UTC)
        base = len(self.attempts)
        try:
            async with aclosing(
                cloud.upstreams.stream(
                    run, self.spec.messages, self.spec.params, cloud.vault_key, self.spec.job_id
                )
            ) as events:
                async for event in events:
                    if isinstance(event, Delta):
                        if self.first_token_at is None:
                            self.first_token_at = time.monotonic()
                        yield event
                    else:
                        self._succeed_cloud(run, event)
                        yield event
                        return
        finally:
            for number, attempt in enumerate(run.attempts, base + 1):
                self.attempts.append(
                    AttemptRecord(
                        attempt=number,
                        device_id=f"cloud:{attempt.upstream}",
                        outcome=attempt.outcome,
                        error_code=attempt.error_code,
                        started_at=started,
                        first_token_ms=None,
                        duration_ms=attempt.duration_ms,
                    )
                )

    async def _cloud_complete(self) -> Completion:
        parts: list[str] = []
        async with aclosing(self._cloud_events()) as events:
            async for event in events:
                if isinstance(event, Delta):
                    parts.append(event.text)
        assert self.completion is not None
        self.completion.text = "".join(parts)
        return self.completion

    def _succeed_cloud(self, run: CloudRun, done: Done) -> None:
        self.finished_at = time.monotonic()
        self._move(JobState.SUCCEEDED)
        self.inference_type = "cloud"
        self.device = None
        self.model = self.spec.model
        self.completion = Completion(
            text=done.text or "",
            finish_reason=done.finish_reason,
            prompt_tokens=done.usage.prompt_tokens,
            completion_tokens=done.usage.completion_tokens,
        )
        if self.trace is not None:
            self.trace.finished(self)

    def _joined(self, device: DeviceConnection, model: str, done: Done) -> Done:
        """The last device's Done, with usage for the whole answer: the prompt once (the
        continuing device's prompt less the text it was given) and every part's tokens."""
        earlier = sum(part.completion_tokens for part in self.parts)
        prompt = max(0, done.usage.prompt_tokens - earlier)
        first = self.parts[0]
        self.parts[0] = Part(
            first.device_id, first.account_id, first.model, prompt, first.completion_tokens
        )
        self.parts.append(
            Part(device.device_id, device.account_id, model, 0, done.usage.completion_tokens)
        )
        usage = Usage(
            prompt_tokens=prompt, completion_tokens=earlier + done.usage.completion_tokens
        )
        return Done(
            type="done",
            job_id=done.job_id,
            finish_reason=done.finish_reason,
            usage=usage,
            text=done.text,
        )

    # -- one attempt --------------------------------------------------------------------
    async def _attempt(
        self,
        number: int,
        device: DeviceConnection,
        model: str,
        prefix: str | None = None,
        used_tokens: int = 0,
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
        traced = (
            None
            if self.trace is None
            else self.trace.attempt(number, device, model, prefix is not None)
        )
        try:
            try:
                device.send(_job_frame(spec, attempt_id, model, prefix, used_tokens))
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
                    done_at = time.monotonic()
                    self.observer.succeeded(
                        device,
                        model,
                        (first_at - started) * 1000,
                        event.usage.completion_tokens,
                        done_at - first_at,
                        done_at - started,
                    )
                    self.registry.measured(device, model)
                    yield event
                    return
                elif isinstance(event, JobError):
                    outcome = "refused" if event.code in REFUSAL_CODES else "failed"
                    raise _AttemptFailed(outcome, event.code, event.message)
                elif isinstance(event, DeviceLost):
                    raise _AttemptFailed("gone", "DEVICE_GONE", event.reason)
        except _AttemptFailed as failure:
            outcome, code = failure.outcome, failure.code
            # A device that declines a job (refused) has not failed it.
            self.observer.failed(device, model, outcome, time.monotonic())
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
            if traced is not None:
                traced.finish(record)

    # -- endings ------------------------------------------------------------------------
    def _succeed(
        self, device: DeviceConnection, model: str, done: Done, text: str | None
    ) -> Completion:
        self.finished_at = time.monotonic()
        self._move(JobState.SUCCEEDED)
        self.completion = Completion(
            text=text or "",
            finish_reason=done.finish_reason,
            prompt_tokens=done.usage.prompt_tokens,
            completion_tokens=done.usage.completion_tokens,
        )
        self.device = device
        self.model = model
        if not self.spec.internal:
            device.jobs_served += 1
        if self.trace is not None:
            self.trace.finished(self)
        return self.completion

    def _fail(self, error: SwarmgateError) -> None:
        if not self.state.finished:
            self.finished_at = time.monotonic()
            self.error = error
            self._move(JobState.FAILED)
            if self.trace is not None:
                self.trace.finished(self)

    def _cancel(self) -> None:
        if not self.state.finished:
            self.finished_at = time.monotonic()
            self._move(JobState.CANCELLED)
            if self.trace is not None:
                self.trace.finished(self)


def _pinned(route: Route, model: str) -> Route:
    """``route`` narrowed to one model: a continuation must use the model that started."""
    return Route(
        models=(model,),
        tier=route.tier,
        trusted_only=route.trusted_only,
        verified_only=route.verified_only,
        max_latency_ms=None,  # a continuation takes whoever can finish the answer
        allow=route.allow,
        deny=route.deny,
        max_price=route.max_price,
        prompt_tokens=route.prompt_tokens,
        max_tokens=route.max_tokens,
    )


def _job_frame(
    spec: JobSpec, attempt_id: str, model: str, prefix: str | None, used_tokens: int
) -> str:
    messages = [{"role": m.role, "content": m.content} for m in spec.messages]
    params = spec.params.model_dump()
    frame: dict[str, object] = {
        "type": "job",
        "job_id": attempt_id,
        "model": model,
        "messages": messages,
        "params": params,
        "stream": spec.stream,
    }
    if prefix is not None:
        messages.append({"role": "assistant", "content": prefix})
        params["max_tokens"] = spec.params.max_tokens - used_tokens
        frame["continue_final"] = True
    return orjson.dumps(frame).decode()


def _send_cancel(device: DeviceConnection, attempt_id: str) -> None:
    with suppress(DeviceGone):
        device.send(orjson.dumps({"type": "cancel", "job_id": attempt_id}).decode())
