"""The raw floor: the least any Python HTTP server on this box can do per request.

A bare ASGI callable (no framework, no routing, no validation) served by uvicorn with
uvloop and httptools, the same server stack ``swarmgate serve`` uses. It reads the
request body and answers ``POST`` with fixed bytes captured from a real gateway answer:
the ``chat.completion`` JSON, or (when the body asks for ``"stream": true``) the same
SSE frames the gateway streamed, one body message per frame.

    taskset -c 0 .venv/bin/python benchmarks/floor_app.py PORT COMPLETION_JSON STREAM_FRAMES_JSON
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import orjson
import uvicorn


def build_app(completion: bytes, frames: list[bytes]) -> Any:
    json_start = {
        "type": "http.response.start",
        "status": 200,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(completion)).encode()),
        ],
    }
    json_body = {"type": "http.response.body", "body": completion, "more_body": False}
    sse_start = {
        "type": "http.response.start",
        "status": 200,
        "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ],
    }
    frame_messages = [
        {"type": "http.response.body", "body": frame, "more_body": True} for frame in frames
    ]
    end = {"type": "http.response.body", "body": b"", "more_body": False}

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        if b'"stream":true' in body or b'"stream": true' in body:
            await send(sse_start)
            for message in frame_messages:
                await send(message)
            await send(end)
        else:
            await send(json_start)
            await send(json_body)

    return app


def main() -> None:
    port = int(sys.argv[1])
    completion = Path(sys.argv[2]).read_bytes()
    frames = [f.encode() for f in orjson.loads(Path(sys.argv[3]).read_bytes())]
    config = uvicorn.Config(
        build_app(completion, frames),
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        lifespan="on",
    )
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
