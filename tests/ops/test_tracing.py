"""OpenTelemetry tracing, against a real gateway: spans per request, job and attempt,
billing events; the caller's trace continued; sampling; no prompt, answer or key in any
span; nothing of the SDK loaded or run when tracing is off; a real OTLP/HTTP export."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from pydantic import ValidationError

from swarmgate.accounts.keys import LIVE_PREFIX
from swarmgate.config import GatewaySettings
from swarmgate.routing.profile import MEASURED_AFTER
from swarmgate.tracing.otel import OtelTracing
from tests.conftest import MODEL, LiveGateway, fast_settings, free_port, start_gateway, stop_gateway

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
async def traced(tmp_path: Path) -> AsyncIterator[tuple[LiveGateway, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    live = await start_gateway(fast_settings(tmp_path), OtelTracing(exporter, batch=False))
    try:
        yield live, exporter
    finally:
        await stop_gateway(live)


def chat(text: str, **extra: object) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], **extra}


async def server_span(exporter: InMemorySpanExporter, request_id: str) -> ReadableSpan:
    """The request's server span; it ends just after the response's last byte is sent."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for span in exporter.get_finished_spans():
            if span.kind is SpanKind.SERVER and span.attributes.get("swarmgate.request_id") == (
                request_id
            ):
                return span
        await asyncio.sleep(0.01)
    raise AssertionError(f"no server span for request {request_id}")


def children(exporter: InMemorySpanExporter, parent: ReadableSpan, name: str) -> list[ReadableSpan]:
    assert parent.context is not None
    found = [
        span
        for span in exporter.get_finished_spans()
        if span.name == name
        and span.parent is not None
        and span.parent.span_id == parent.context.span_id
    ]
    return sorted(found, key=lambda span: span.start_time or 0)


def billing_events(server: ReadableSpan) -> tuple[Event, Event]:
    hold, settle = server.events
    assert (hold.name, settle.name) == ("swarmgate.billing.hold", "swarmgate.billing.settle")
    return hold, settle


async def test_a_completion_and_a_stream_each_make_request_job_and_attempt_spans(
    traced: tuple[LiveGateway, InMemorySpanExporter],
) -> None:
    live, exporter = traced
    await live.add_sim_device()
    account_id, key = await live.developer_key()
    async with live.client(key) as client:
        plain = await client.post("/v1/chat/completions", json=chat("hello"))
        streamed = await client.post("/v1/chat/completions", json=chat("hello", stream=True))
        missing = await client.get("/v1/jobs/job_missing")
    assert plain.status_code == streamed.status_code == 200
    assert missing.status_code == 404
    device_id = plain.json()["swarmgate"]["device_id"]

    for response, stream in ((plain, False), (streamed, True)):
        server = await server_span(exporter, response.headers["x-request-id"])
        assert server.name == "POST /v1/chat/completions"
        assert server.attributes["http.route"] == "/v1/chat/completions"
        assert server.attributes["http.request.method"] == "POST"
        assert "url.path" not in server.attributes  # the route itself
        assert server.attributes["http.response.status_code"] == 200
        assert server.attributes["swarmgate.account_id"] == account_id
        assert server.attributes["gen_ai.request.model"] == MODEL
        assert server.status.status_code is StatusCode.UNSET

        [job] = children(exporter, server, "swarmgate.job")
        assert job.attributes["swarmgate.stream"] is stream
        assert job.attributes["swarmgate.job.status"] == "succeeded"
        assert job.attributes["swarmgate.device_id"] == device_id
        assert job.attributes["gen_ai.usage.output_tokens"] == 24
        [attempt] = children(exporter, job, "swarmgate.attempt")
        assert attempt.kind is SpanKind.CLIENT
        assert attempt.attributes["swarmgate.device_id"] == device_id
        assert attempt.attributes["swarmgate.device.remote"] is False
        assert attempt.attributes["swarmgate.attempt.outcome"] == "succeeded"
        assert attempt.status.status_code is StatusCode.UNSET
        hold, settle = billing_events(server)
        assert hold.attributes is not None and settle.attributes is not None
        assert hold.attributes["swarmgate.job_id"] == job.attributes["swarmgate.job_id"]
        assert settle.attributes["swarmgate.charged_micros"] > 0
        assert settle.attributes["swarmgate.duration_ms"] >= 0
        # Each span encloses its children; the request's ends with the stream's last byte.
        assert server.end_time is not None and job.end_time is not None
        assert attempt.end_time is not None and job.start_time is not None
        assert attempt.end_time <= job.end_time <= server.end_time
        assert hold.timestamp < job.start_time < settle.timestamp <= server.end_time

    templated = await server_span(exporter, missing.headers["x-request-id"])
    assert templated.name == "GET /v1/jobs/{job_id}"
    assert templated.attributes["http.route"] == "/v1/jobs/{job_id}"
    assert templated.attributes["url.path"] == "/v1/jobs/job_missing"
    assert templated.attributes["http.response.status_code"] == 404


async def test_failover_shows_a_failed_attempt_then_a_successful_one(
    traced: tuple[LiveGateway, InMemorySpanExporter],
) -> None:
    live, exporter = traced
    await live.add_sim_device(length=5)
    healthy = live.gateway.registry.devices()[0]
    failing_agent = await live.add_sim_device(error_after_tokens=0, length=5)
    assert failing_agent.stats.device_id is not None
    failing = live.gateway.registry.get(failing_agent.stats.device_id)
    assert failing is not None
    # So the failing device, faster on paper, is tried first.
    for device, ttft in ((healthy, 10_000.0), (failing, 1.0)):
        stats = device.profile.model_stats(MODEL)
        stats.ttft_ms, stats.samples = ttft, MEASURED_AFTER
        live.gateway.registry.measured(device, MODEL)
    _, key = await live.developer_key()
    async with live.client(key) as client:
        response = await client.post("/v1/chat/completions", json=chat("fail over"))
    assert response.status_code == 200
    assert response.json()["swarmgate"]["attempts"] == 2

    server = await server_span(exporter, response.headers["x-request-id"])
    [job] = children(exporter, server, "swarmgate.job")
    first, second = children(exporter, job, "swarmgate.attempt")
    assert first.attributes["swarmgate.device_id"] == failing.device_id
    assert first.attributes["swarmgate.attempt.outcome"] == "failed"
    assert first.attributes["swarmgate.failover_reason"] == "failed"
    assert first.attributes["error.type"] == "SIM_FAILURE"
    assert first.status.status_code is StatusCode.ERROR
    assert second.attributes["swarmgate.device_id"] == healthy.device_id
    assert second.attributes["swarmgate.attempt"] == 2
    assert second.status.status_code is StatusCode.UNSET
    assert job.attributes["swarmgate.attempts"] == 2
    assert job.status.status_code is StatusCode.UNSET


async def test_a_5xx_marks_the_request_and_job_spans_as_errors(
    traced: tuple[LiveGateway, InMemorySpanExporter],
) -> None:
    live, exporter = traced
    await live.add_sim_device(error_after_tokens=0)
    _, key = await live.developer_key()
    async with live.client(key) as client:
        response = await client.post("/v1/chat/completions", json=chat("no luck"))
    assert response.status_code == 502
    server = await server_span(exporter, response.headers["x-request-id"])
    assert server.status.status_code is StatusCode.ERROR
    assert server.attributes["http.response.status_code"] == 502
    [job] = children(exporter, server, "swarmgate.job")
    assert job.status.status_code is StatusCode.ERROR
    assert job.attributes["error.type"] == "ALL_ATTEMPTS_FAILED"
    assert job.attributes["swarmgate.job.status"] == "failed"
    assert all(
        a.status.status_code is StatusCode.ERROR
        for a in children(exporter, job, "swarmgate.attempt")
    )
    # The hold was taken and given back: no settlement.
    assert [event.name for event in server.events] == ["swarmgate.billing.hold"]


async def test_an_incoming_traceparent_is_continued(
    traced: tuple[LiveGateway, InMemorySpanExporter],
) -> None:
    live, exporter = traced
    await live.add_sim_device()
    _, key = await live.developer_key()
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    async with live.client(key) as client:
        response = await client.post(
            "/v1/chat/completions",
            json=chat("continue my trace", stream=True),
            headers={"traceparent": f"00-{trace_id}-{parent_id}-01"},
        )
        fresh = await client.post("/v1/chat/completions", json=chat("a trace of its own"))
    server = await server_span(exporter, response.headers["x-request-id"])
    assert server.context is not None and server.parent is not None
    assert server.context.trace_id == int(trace_id, 16)
    assert server.parent.span_id == int(parent_id, 16) and server.parent.is_remote
    [job] = children(exporter, server, "swarmgate.job")
    [attempt] = children(exporter, job, "swarmgate.attempt")
    assert job.context is not None and attempt.context is not None
    assert job.context.trace_id == attempt.context.trace_id == int(trace_id, 16)
    other = await server_span(exporter, fresh.headers["x-request-id"])
    assert other.parent is None
    assert other.context is not None and other.context.trace_id != int(trace_id, 16)


async def test_sampled_out_requests_record_nothing_unless_the_caller_samples(
    tmp_path: Path,
) -> None:
    exporter = InMemorySpanExporter()
    tracing = OtelTracing(exporter, batch=False, sample_ratio=0.0)
    live = await start_gateway(fast_settings(tmp_path), tracing)
    try:
        await live.add_sim_device()
        _, key = await live.developer_key()
        trace_id = secrets.token_hex(16)
        async with live.client(key) as client:
            dropped = await client.post("/v1/chat/completions", json=chat("unsampled"))
            kept = await client.post(
                "/v1/chat/completions",
                json=chat("sampled by the caller"),
                headers={"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"},
            )
        assert dropped.status_code == kept.status_code == 200
        server = await server_span(exporter, kept.headers["x-request-id"])
        spans = exporter.get_finished_spans()
        assert {span.context.trace_id for span in spans if span.context} == {int(trace_id, 16)}
        assert len(children(exporter, server, "swarmgate.job")) == 1
    finally:
        await stop_gateway(live)


async def test_no_span_holds_prompt_answer_or_key(
    traced: tuple[LiveGateway, InMemorySpanExporter],
) -> None:
    live, exporter = traced
    await live.add_sim_device()
    await live.add_sim_device(error_after_tokens=2)  # fails mid-answer, sometimes first
    _, key = await live.developer_key()
    marker = f"prompt-marker-{secrets.token_hex(8)}"
    answers: list[str] = []
    async with live.client(key) as client:
        for stream in (False, True, False, True):
            response = await client.post(
                "/v1/chat/completions",
                json=chat(f"please repeat {marker}", stream=stream),
                headers={"X-Request-ID": f"marker-{len(answers)}"},
            )
            assert response.status_code == 200
            if stream:
                answers.append(
                    "".join(
                        json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                        for line in response.text.splitlines()
                        if line.startswith("data: {") and '"choices":[{' in line
                    )
                )
            else:
                answers.append(response.json()["choices"][0]["message"]["content"])
            await server_span(exporter, f"marker-{len(answers) - 1}")
    spans = exporter.get_finished_spans()
    assert {span.name for span in spans} >= {"swarmgate.job", "swarmgate.attempt"}
    exported = "\n".join(span.to_json() for span in spans)
    assert marker not in exported
    assert key.removeprefix(LIVE_PREFIX) not in exported
    for answer in answers:
        assert len(answer) > 20
        assert answer not in exported


async def test_tracing_off_builds_the_app_without_it(live: LiveGateway) -> None:
    assert live.gateway.tracing is None
    assert type(live.server.config.app.app).__name__ == "Idempotency"


def test_tracing_off_loads_and_runs_nothing_of_it(tmp_path: Path) -> None:
    """With tracing off, starting a gateway, serving a completion and stopping import no
    OpenTelemetry module that importing the gateway had not (FastAPI imports the API for
    its own telemetry, which the app turns off; redis-py imports the SDK's metrics when
    they are installed), never the tracing SDK, exporter or ``swarmgate.tracing.otel``,
    and while the request is served no OpenTelemetry or tracing code runs at all."""
    script = f"""
import asyncio, json, sys
from pathlib import Path
from tests.conftest import MODEL, fast_settings, start_gateway, stop_gateway
prefixes = ("opentelemetry", "swarmgate.tracing")
before = sorted(m for m in sys.modules if m.startswith(prefixes))
ran = set()

def profile(frame, event, arg):
    if event == "call":
        name = frame.f_code.co_filename
        if "/opentelemetry/" in name or "/swarmgate/tracing/" in name:
            ran.add(name)

async def main():
    live = await start_gateway(fast_settings(Path({str(tmp_path)!r})))
    try:
        await live.add_sim_device()
        _, key = await live.developer_key()
        async with live.client(key) as client:
            for stream in (False, True):
                body = {{"model": MODEL, "stream": stream,
                         "messages": [{{"role": "user", "content": "hi"}}]}}
                sys.setprofile(profile)
                response = await client.post("/v1/chat/completions", json=body)
                sys.setprofile(None)
                assert response.status_code == 200, response.text
    finally:
        await stop_gateway(live)

asyncio.run(main())
after = sorted(m for m in sys.modules if m.startswith(prefixes))
print(json.dumps({{"before": before, "after": after, "ran": sorted(ran)}}))
"""
    result = subprocess.run(  # noqa: S603 - this interpreter, a fixed script
        [sys.executable, "-c", script],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["after"] == report["before"]
    assert "swarmgate.tracing.otel" not in report["after"]
    tracing_parts = ("opentelemetry.sdk.trace", "opentelemetry.exporter")
    assert not [m for m in report["after"] if m.startswith(tracing_parts)]
    assert report["ran"] == []


def test_configured_tracing_without_the_extra_refuses_to_start(tmp_path: Path) -> None:
    # The SDK made unimportable, as in an install without the `otel` extra.
    script = (
        "import sys; sys.modules['opentelemetry.sdk'] = None; "
        "from swarmgate.cli import main; "
        f"main(['serve', '--port', '{free_port()}', '--data-dir', {str(tmp_path)!r}])"
    )
    result = subprocess.run(  # noqa: S603 - this interpreter, a fixed script
        [sys.executable, "-c", script],
        cwd=REPO,
        env={**os.environ, "SWARMGATE_OTEL_ENDPOINT": "http://127.0.0.1:4318/v1/traces"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("swarmgate.tracing.TracingUnavailable: SWARMGATE_OTEL_ENDPOINT is set")
    assert "pip install 'swarmgate[otel]'" in last
    assert not (tmp_path / "swarmgate.db").exists()  # refused before touching anything


def test_the_endpoint_must_be_an_http_url(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="SWARMGATE_OTEL_ENDPOINT must be an http"):
        GatewaySettings(data_dir=tmp_path, otel_endpoint="collector:4318")
    with pytest.raises(ValidationError):
        GatewaySettings(data_dir=tmp_path, otel_sample_ratio=1.5)


@pytest.fixture
def collector() -> Iterator[tuple[str, list[tuple[str, str, bytes]]]]:
    """A stand-in OTLP/HTTP collector: records each POST (path, content type, body)."""
    received: list[tuple[str, str, bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            received.append((self.path, self.headers.get("content-type") or "", body))
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1/traces", received
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


async def test_spans_reach_an_otlp_http_collector_by_the_gateway_stop(
    tmp_path: Path,
    collector: tuple[str, list[tuple[str, str, bytes]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    endpoint, received = collector
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    settings = fast_settings(tmp_path, otel_endpoint=endpoint, otel_service_name="gw-under-test")
    live = await start_gateway(settings)
    try:
        await live.add_sim_device()
        _, key = await live.developer_key()
        async with live.client(key) as client:
            response = await client.post("/v1/chat/completions", json=chat("export me"))
        assert response.status_code == 200
    finally:
        await stop_gateway(live)  # the batch still buffered is exported on the way out

    assert received, "the collector got nothing"
    names: set[str] = set()
    services: set[str] = set()
    for path, content_type, body in received:
        assert path == "/v1/traces"
        assert content_type == "application/x-protobuf"
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        for resource_spans in request.resource_spans:
            services |= {
                a.value.string_value
                for a in resource_spans.resource.attributes
                if a.key == "service.name"
            }
            for scope_spans in resource_spans.scope_spans:
                names |= {span.name for span in scope_spans.spans}
    assert services == {"gw-under-test"}
    assert {"POST /v1/chat/completions", "swarmgate.job", "swarmgate.attempt"} <= names
