"""Tracing through the OpenTelemetry SDK, exported over OTLP/HTTP.

Imported only when tracing is on (``tracing_from_settings``). The spans:

* ``{method} {route}`` (server): one per HTTP request, named by the route template
  (``POST /v1/chat/completions``, ``GET /v1/jobs/{job_id}``), continuing the caller's
  trace when it sends a W3C ``traceparent``. It ends when the response does, the last
  chunk of a stream included. 5xx answers and unhandled exceptions mark it as an error.
  Health probes and metric scrapes are not traced.
* ``swarmgate.job``: running one job (routing, failover, continuation, a cloud
  upstream), with its outcome, the serving device or upstream and the token counts.
* ``swarmgate.attempt`` (client): one try on one device, with the device, whether it is
  connected to another gateway, the outcome and the error code; failures are errors.
* Events ``swarmgate.billing.hold`` and ``swarmgate.billing.settle`` on the request's
  span, with their duration, the amount charged, and the error code if one failed.

The gateway keeps its own tracer provider (never the process-wide one), so FastAPI's
built-in telemetry and other libraries are unaffected. Attributes are ids, codes,
counts and timings: prompt and answer text, error messages (which may quote either),
and credentials never go into a span.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from swarmgate import __version__
from swarmgate.errors import SwarmgateError
from swarmgate.logs import request_id
from swarmgate.routing.states import JobState

if TYPE_CHECKING:
    from swarmgate.routing.dispatch import AttemptRecord, Execution, JobSpec
    from swarmgate.routing.registry import DeviceConnection

# Probed or scraped every few seconds: spans for them would drown the useful ones.
UNTRACED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
# Attempt outcomes that sent the job elsewhere (or ended it): the attempt span is an error.
FAILED_OUTCOMES = frozenset({"failed", "refused", "timeout", "gone", "interrupted"})
_KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
# A node reports its own error codes; only code-shaped ones are copied into a span, so a
# misbehaving device cannot put answer text there.
_CODE = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")
_PROPAGATOR = TraceContextTextMapPropagator()
_CONTEXT_HEADERS = (b"traceparent", b"tracestate")


class OtelTracing:
    """A tracer provider of the gateway's own, and the spans the gateway makes with it.

    ``exporter`` receives the finished spans: OTLP/HTTP in production
    (``exporting_to``); tests pass the SDK's in-memory exporter with ``batch=False`` so
    that every span is exported the moment it ends.
    """

    def __init__(
        self,
        exporter: SpanExporter,
        *,
        service_name: str = "swarmgate-gateway",
        sample_ratio: float = 1.0,
        batch: bool = True,
    ) -> None:
        self.provider = TracerProvider(
            sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
            resource=Resource.create(
                {"service.name": service_name, "service.version": __version__}
            ),
            # Shut down by the gateway's lifespan; no process-exit hook per provider.
            shutdown_on_exit=False,
        )
        processor = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
        self.provider.add_span_processor(processor)
        self.tracer: Tracer = self.provider.get_tracer("swarmgate", __version__)

    @classmethod
    def exporting_to(
        cls, endpoint: str, *, service_name: str, sample_ratio: float = 1.0
    ) -> OtelTracing:
        """Spans batched in a background thread and posted to the OTLP/HTTP traces URL
        ``endpoint``. Headers, timeout and TLS follow the standard
        ``OTEL_EXPORTER_OTLP_TRACES_*`` variables."""
        return cls(
            OTLPSpanExporter(endpoint=endpoint),
            service_name=service_name,
            sample_ratio=sample_ratio,
        )

    def server_spans(self, app: ASGIApp, routes: Iterable[str]) -> ASGIApp:
        return ServerSpans(app, self.tracer, frozenset(routes))

    def job(self, spec: JobSpec) -> JobSpan:
        return JobSpan(self.tracer, spec)

    def billing(self, operation: str, job_id: str) -> BillingEvent:
        return BillingEvent(f"swarmgate.billing.{operation}", job_id)

    async def shutdown(self) -> None:
        # Exporting the last batch is blocking network IO: off the event loop.
        await asyncio.to_thread(self.provider.shutdown)


# Each span gets its attributes in one call, as it ends: setting them one by one costs the
# SDK a lock and a validation each, and passing them to start_span validates them twice.
# Every attribute is also encoded for export, a few microseconds each: spans carry only
# what a reader of the trace needs.


class ServerSpans:
    """ASGI wrapper: one server span per HTTP request, current while it is handled."""

    def __init__(self, app: ASGIApp, tracer: Tracer, routes: frozenset[str]) -> None:
        self.app = app
        self.tracer = tracer
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in UNTRACED_PATHS:
            await self.app(scope, receive, send)
            return
        method: str = scope["method"]
        if method not in _KNOWN_METHODS:
            method = "_OTHER"
        path: str = scope["path"]
        route = path if path in self.routes else None
        prefix = "HTTP" if method == "_OTHER" else method
        parent = _caller_context(scope["headers"])
        span = self.tracer.start_span(
            prefix if route is None else f"{prefix} {route}", context=parent, kind=SpanKind.SERVER
        )
        attributes: dict[str, AttributeValue] = {"http.request.method": method}
        rid = request_id.get()
        if rid is not None:
            attributes["swarmgate.request_id"] = rid
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        status = 0

        async def send_traced(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_traced)
        except BaseException as exc:
            # The exception's name only: its message may quote the request.
            attributes["error.type"] = type(exc).__qualname__
            span.set_status(Status(StatusCode.ERROR))
            raise
        finally:
            otel_context.detach(token)
            if route is None:
                # The router records the route it matched in the scope.
                template = getattr(scope.get("route"), "path", None)
                if isinstance(template, str):
                    route = template
                    span.update_name(f"{prefix} {route}")
                attributes["url.path"] = path  # differs from its template, or matched none
            if route is not None:
                attributes["http.route"] = route
            if status:
                attributes["http.response.status_code"] = status
                if status >= 500:
                    attributes["error.type"] = str(status)
                    span.set_status(Status(StatusCode.ERROR))
            span.set_attributes(attributes)
            span.end()


def _caller_context(headers: Iterable[tuple[bytes, bytes]]) -> Context | None:
    """The caller's trace from ``traceparent`` (and ``tracestate``), if it sent one."""
    carrier: dict[str, str] | None = None
    for name, value in headers:
        if name in _CONTEXT_HEADERS:
            if carrier is None:
                carrier = {}
            carrier[name.decode()] = value.decode("latin-1")
    if carrier is None or "traceparent" not in carrier:
        return None
    return _PROPAGATOR.extract(carrier)


class JobSpan:
    """The span of one job, parent of its attempts' spans. Made when the job's execution
    is; the job's id, account and model also go on the request's server span (the first
    job's, for a request that runs several).

    A job succeeds as its last attempt delivers the answer, a moment before that attempt
    is wound up; the job's span then ends with its last attempt's, so that it encloses
    all of them."""

    __slots__ = ("attributes", "context", "done", "open", "span", "tracer")

    def __init__(self, tracer: Tracer, spec: JobSpec) -> None:
        self.tracer = tracer
        self.open = 0  # attempts started and not finished
        self.done = False
        self.attributes: dict[str, AttributeValue] = {
            "swarmgate.job_id": spec.job_id,
            "swarmgate.account_id": spec.account_id,
            "gen_ai.request.model": spec.model,
        }
        server = trace.get_current_span()
        known = getattr(server, "attributes", None)
        if server.is_recording() and known is not None and "swarmgate.job_id" not in known:
            server.set_attributes(self.attributes)
        self.attributes["swarmgate.job.kind"] = spec.kind
        self.attributes["swarmgate.stream"] = spec.stream
        self.span = tracer.start_span("swarmgate.job")
        # Attempts may start in another task (a stream's body): their parent is explicit.
        self.context = trace.set_span_in_context(self.span)

    def attempt(
        self, number: int, device: DeviceConnection, model: str, continuation: bool
    ) -> AttemptSpan:
        attributes: dict[str, AttributeValue] = {
            "swarmgate.attempt": number,
            "swarmgate.device_id": device.device_id,
            "gen_ai.request.model": model,
            # Connected to another gateway of the network: the job crossed over Redis.
            "swarmgate.device.remote": not device.local,
        }
        holder = getattr(device, "holder", "")
        if holder:
            attributes["swarmgate.device.gateway_id"] = holder
        if continuation:  # a stream continued after its device failed
            attributes["swarmgate.continuation"] = True
        self.open += 1
        span = self.tracer.start_span(
            "swarmgate.attempt", context=self.context, kind=SpanKind.CLIENT
        )
        return AttemptSpan(span, attributes, self)

    def attempt_ended(self) -> None:
        self.open -= 1
        if self.done and self.open == 0:
            self.span.end()

    def finished(self, execution: Execution) -> None:
        span, attributes = self.span, self.attributes
        attributes["swarmgate.job.status"] = execution.state.value
        attributes["swarmgate.inference_type"] = execution.inference_type
        attributes["swarmgate.attempts"] = len(execution.attempts)
        if execution.model is not None:
            attributes["gen_ai.response.model"] = execution.model
        if execution.device is not None and execution.state is JobState.SUCCEEDED:
            attributes["swarmgate.device_id"] = execution.device.device_id
        run = execution.cloud_run
        if run is not None and run.upstream:
            attributes["swarmgate.upstream"] = run.upstream
        ttft_ms = execution.ttft_ms
        if ttft_ms is not None:
            attributes["swarmgate.ttft_ms"] = ttft_ms
        completion = execution.completion
        if completion is not None:
            attributes["gen_ai.usage.input_tokens"] = completion.prompt_tokens
            attributes["gen_ai.usage.output_tokens"] = completion.completion_tokens
        if execution.parts:
            attributes["swarmgate.continued_parts"] = len(execution.parts)
        error = execution.error
        if execution.state is JobState.FAILED and error is not None:
            attributes["error.type"] = error.code
            span.set_status(Status(StatusCode.ERROR, error.code))
        span.set_attributes(attributes)
        self.done = True
        if self.open == 0:
            span.end()


class AttemptSpan:
    __slots__ = ("attributes", "job", "span")

    def __init__(self, span: Span, attributes: dict[str, AttributeValue], job: JobSpan) -> None:
        self.span = span
        self.attributes = attributes
        self.job = job

    def finish(self, record: AttemptRecord) -> None:
        span, attributes = self.span, self.attributes
        attributes["swarmgate.attempt.outcome"] = record.outcome
        if record.first_token_ms is not None:
            attributes["swarmgate.ttft_ms"] = record.first_token_ms
        if record.outcome in FAILED_OUTCOMES:
            code = record.error_code or ""
            code = code if _CODE.match(code) else "DEVICE_ERROR"
            # Why the job went on to another device, as the failover saw it.
            attributes["swarmgate.failover_reason"] = record.outcome
            attributes["error.type"] = code
            span.set_status(Status(StatusCode.ERROR, code))
        span.set_attributes(attributes)
        span.end()
        self.job.attempt_ended()


class BillingEvent:
    """A hold or settlement, as an event on the request's span: a span of its own would
    cost about three times as much, on every request."""

    __slots__ = ("job_id", "name", "span", "started")

    def __init__(self, name: str, job_id: str) -> None:
        self.name = name
        self.job_id = job_id
        self.span = trace.get_current_span()
        self.started = time.perf_counter()

    def end(self, error: BaseException | None = None, charged_micros: int | None = None) -> None:
        span = self.span
        if not span.is_recording():
            return
        attributes: dict[str, AttributeValue] = {
            "swarmgate.job_id": self.job_id,
            "swarmgate.duration_ms": round((time.perf_counter() - self.started) * 1000, 3),
        }
        if charged_micros is not None:
            attributes["swarmgate.charged_micros"] = charged_micros
        if error is not None:
            code = error.code if isinstance(error, SwarmgateError) else type(error).__qualname__
            attributes["error.type"] = code
        span.add_event(self.name, attributes)
