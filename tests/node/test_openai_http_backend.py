"""The openai-http backend against a real local HTTP server (Starlette under uvicorn)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from swarmgate.node.backends.base import (
    BackendError,
    Finished,
    GenerationEvent,
    GenerationRequest,
    TokenDelta,
)
from swarmgate.node.backends.openai_http import OpenAIHTTPBackend
from swarmgate.protocol import ChatMessage, SamplingParams

WORDS = ["Hel", "lo", " world"]


@dataclass
class FakeServer:
    base_url: str = ""
    bodies: list[dict[str, Any]] = field(default_factory=list)
    auth_headers: list[str | None] = field(default_factory=list)
    slow_stream_closed: threading.Event = field(default_factory=threading.Event)


def _chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
    payload = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
    return f"data: {json.dumps(payload)}\n\n".encode()


def build_app(state: FakeServer) -> Starlette:
    async def models(request: Request) -> Response:
        state.auth_headers.append(request.headers.get("authorization"))
        return JSONResponse({"object": "list", "data": [{"id": "served-model"}, {"id": "plain"}]})

    async def answer(with_usage: bool, max_tokens: int) -> AsyncIterator[bytes]:
        yield _chunk({"role": "assistant"})
        yield b": keep-alive\n\n"
        for word in WORDS[:max_tokens]:
            yield _chunk({"content": word})
        yield _chunk({}, "length" if max_tokens <= len(WORDS) else "stop")
        if with_usage:
            usage = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode()
        yield b"data: [DONE]\n\n"

    async def endless() -> AsyncIterator[bytes]:
        try:
            while True:
                yield _chunk({"content": " tick"})
                await asyncio.sleep(0.02)
        finally:
            state.slow_stream_closed.set()

    async def truncated() -> AsyncIterator[bytes]:
        yield _chunk({"content": "Hel"})

    async def chat(request: Request) -> Response:
        body = await request.json()
        state.bodies.append(body)
        model = body["model"]
        if model == "fail":
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)
        if model == "slow":
            return StreamingResponse(endless(), media_type="text/event-stream")
        if model == "truncated":
            return StreamingResponse(truncated(), media_type="text/event-stream")
        stream = answer(with_usage=model != "plain", max_tokens=body["max_tokens"])
        return StreamingResponse(stream, media_type="text/event-stream")

    return Starlette(
        routes=[
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/chat/completions", chat, methods=["POST"]),
        ]
    )


@pytest.fixture(scope="module")
def server() -> Iterator[FakeServer]:
    state = FakeServer()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(build_app(state), log_level="warning", lifespan="off", loop="asyncio")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not uv.started:
        assert time.monotonic() < deadline, "test server did not start"
        time.sleep(0.01)
    state.base_url = f"http://127.0.0.1:{port}/v1"
    try:
        yield state
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
        sock.close()


def _request(model: str, max_tokens: int = 16, **params: Any) -> GenerationRequest:
    return GenerationRequest(
        job_id="job-1",
        model=model,
        messages=[
            ChatMessage(role="system", content="Be brief."),
            ChatMessage(role="user", content="Say hello."),
        ],
        params=SamplingParams(max_tokens=max_tokens, temperature=0.0, top_p=1.0, **params),
    )


async def _collect(backend: OpenAIHTTPBackend, request: GenerationRequest) -> list[GenerationEvent]:
    return [event async for event in backend.generate(request)]


@pytest.fixture
async def backend(server: FakeServer) -> AsyncIterator[OpenAIHTTPBackend]:
    model_map = {
        "smollm2": "served-model",
        "plain": "plain",
        "fail": "served-model",
        "slow": "served-model",
        "truncated": "served-model",
    }
    backend = OpenAIHTTPBackend(base_url=server.base_url + "/", api_key="k-1", model_map=model_map)
    loaded = await backend.load(["smollm2", "plain", "fail", "slow", "truncated", "absent"])
    assert [m.id for m in loaded] == ["smollm2", "plain", "fail", "slow", "truncated"]
    assert all(m.sha256 is None for m in loaded)
    # The fake server picks its behaviour from the model name, so point these at it after load.
    backend.model_map.update(fail="fail", slow="slow", truncated="truncated")
    try:
        yield backend
    finally:
        await backend.close()


async def test_streams_deltas_and_server_usage(
    backend: OpenAIHTTPBackend, server: FakeServer
) -> None:
    events = await _collect(backend, _request("smollm2", stop=["\n\n"], seed=7))
    deltas = [e for e in events if isinstance(e, TokenDelta)]
    assert [d.text for d in deltas] == WORDS
    assert all(d.tokens == 1 for d in deltas)
    assert events[-1] == Finished(finish_reason="stop", prompt_tokens=11, completion_tokens=3)

    body = server.bodies[-1]
    assert body["model"] == "served-model"
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["stop"] == ["\n\n"]
    assert body["seed"] == 7
    assert body["messages"][1] == {"role": "user", "content": "Say hello."}
    assert server.auth_headers[-1] == "Bearer k-1"


async def test_length_finish_reason(backend: OpenAIHTTPBackend) -> None:
    events = await _collect(backend, _request("smollm2", max_tokens=2))
    assert [e.text for e in events if isinstance(e, TokenDelta)] == WORDS[:2]
    assert isinstance(events[-1], Finished)
    assert events[-1].finish_reason == "length"


async def test_without_usage_counts_chunks_and_estimates_prompt(
    backend: OpenAIHTTPBackend, server: FakeServer
) -> None:
    events = await _collect(backend, _request("plain"))
    finished = events[-1]
    assert isinstance(finished, Finished)
    assert finished.completion_tokens == 3
    assert finished.prompt_tokens > 0
    assert "seed" not in server.bodies[-1]
    assert "stop" not in server.bodies[-1]


async def test_http_500_is_a_backend_error(backend: OpenAIHTTPBackend) -> None:
    with pytest.raises(BackendError, match="500") as info:
        await _collect(backend, _request("fail"))
    assert info.value.code == "UPSTREAM_HTTP_ERROR"


async def test_stream_ending_early_is_a_backend_error(backend: OpenAIHTTPBackend) -> None:
    with pytest.raises(BackendError, match="ended early"):
        await _collect(backend, _request("truncated"))


async def test_unloaded_model_is_refused(backend: OpenAIHTTPBackend) -> None:
    with pytest.raises(BackendError) as info:
        await _collect(backend, _request("absent"))
    assert info.value.code == "MODEL_NOT_LOADED"


async def test_aclose_closes_the_http_stream(
    backend: OpenAIHTTPBackend, server: FakeServer
) -> None:
    server.slow_stream_closed.clear()
    stream = backend.generate(_request("slow"))
    first = await anext(stream)
    second = await anext(stream)
    assert isinstance(first, TokenDelta)
    assert isinstance(second, TokenDelta)
    await stream.aclose()  # type: ignore[attr-defined]
    assert await asyncio.to_thread(server.slow_stream_closed.wait, 5)
    # The pool still serves the next job.
    events = await _collect(backend, _request("smollm2"))
    assert isinstance(events[-1], Finished)


async def test_task_cancellation_closes_the_http_stream(
    backend: OpenAIHTTPBackend, server: FakeServer
) -> None:
    server.slow_stream_closed.clear()
    got_token = asyncio.Event()

    async def consume() -> None:
        async for _event in backend.generate(_request("slow")):
            got_token.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_token.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(server.slow_stream_closed.wait, 5)


async def test_load_fails_when_server_has_none_of_the_models(server: FakeServer) -> None:
    backend = OpenAIHTTPBackend(base_url=server.base_url)
    try:
        with pytest.raises(BackendError, match="none of the requested models"):
            await backend.load(["nope"])
    finally:
        await backend.close()


def _refused_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_connection_refused_is_a_backend_error() -> None:
    backend = OpenAIHTTPBackend(base_url=f"http://127.0.0.1:{_refused_port()}/v1", timeout_s=5)
    try:
        with pytest.raises(BackendError) as info:
            await backend.load(["smollm2"])
        assert info.value.code == "UPSTREAM_UNREACHABLE"
        assert isinstance(info.value.__cause__, Exception)
    finally:
        await backend.close()


async def test_connection_refused_during_generate_is_a_backend_error(server: FakeServer) -> None:
    backend = OpenAIHTTPBackend(base_url=server.base_url, model_map={"smollm2": "served-model"})
    try:
        await backend.load(["smollm2"])
        backend.base_url = f"http://127.0.0.1:{_refused_port()}/v1"
        with pytest.raises(BackendError) as info:
            await _collect(backend, _request("smollm2"))
        assert info.value.code == "UPSTREAM_UNREACHABLE"
    finally:
        await backend.close()
