"""A small OpenAI-compatible server for tests: ``/chat/completions``, streaming or not,
with behaviours chosen per upstream model name or API key."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.conftest import free_port

GOOD_KEY = "sk-platform-good"


@dataclass
class MockUpstream:
    """Answers ``"<name> says: <last user message>"``; records every request it gets.

    Model names steer it: ``*rate-limited*`` → 429 with Retry-After 7, ``*down*`` → 503,
    ``*slow*`` → waits 5 s, ``*no-usage*`` → no usage in the answer, ``*minus-one*`` →
    usage of -1, ``*json-only*`` → a whole JSON answer even when asked to stream,
    ``*burst*`` → every server-sent event of a stream in one write. Keys other than the
    accepted ones → 401.
    """

    name: str
    keys: set[str] = field(default_factory=lambda: {GOOD_KEY})
    port: int = field(default_factory=free_port)
    requests: list[dict[str, Any]] = field(default_factory=list)
    server: uvicorn.Server | None = None
    task: asyncio.Task[None] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        auth = request.headers.get("authorization", "")
        self.requests.append(
            {
                "model": body["model"],
                "auth": auth,
                "stream": body.get("stream"),
                "host": request.headers.get("host"),
            }
        )
        if auth.removeprefix("Bearer ") not in self.keys:
            return JSONResponse({"error": {"message": "invalid api key"}}, status_code=401)
        model: str = body["model"]
        if "rate-limited" in model:
            return JSONResponse(
                {"error": {"message": "slow down"}}, status_code=429, headers={"Retry-After": "7"}
            )
        if "down" in model:
            return JSONResponse({"error": {"message": "unavailable"}}, status_code=503)
        if "slow" in model:
            await asyncio.sleep(5)
        question = body["messages"][-1]["content"]
        words = f"{self.name} says: {question}".split(" ")
        pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
        usage: dict[str, int] | None = {"prompt_tokens": 11, "completion_tokens": len(pieces)}
        if "no-usage" in model:
            usage = None
        elif "minus-one" in model:
            usage = {"prompt_tokens": -1, "completion_tokens": -1}
        if not body.get("stream") or "json-only" in model:
            return JSONResponse(
                {
                    "id": "up-1",
                    "object": "chat.completion",
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "".join(pieces)},
                            "finish_reason": "stop",
                        }
                    ],
                    **({"usage": usage} if usage else {}),
                }
            )

        frames = [
            b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": {"content": piece}}]})
            for piece in pieces
        ]
        final = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        frames.append(b"data: " + orjson.dumps(final))
        if usage is not None:
            frames.append(b"data: " + orjson.dumps({"choices": [], "usage": usage}))
        frames.append(b"data: [DONE]")

        async def events() -> AsyncIterator[bytes]:
            if "burst" in model:
                yield b"".join(frame + b"\n\n" for frame in frames)
                return
            for frame in frames:
                yield frame + b"\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def start(self) -> None:
        app = Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"])])
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_config=None, access_log=False
        )
        self.server = uvicorn.Server(config)
        self.server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
        self.task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self.server is not None and self.task is not None:
            self.server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.task, 5)
