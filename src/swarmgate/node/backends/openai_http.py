"""The ``openai-http`` backend: a local OpenAI-compatible server does the work.

Ollama, llama-server and vLLM all speak ``/v1/models`` and streaming
``/v1/chat/completions``; the node only relays. Every failure to reach or
understand the server becomes a ``BackendError`` so the gateway can fail over.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import orjson

from swarmgate.node.backends.base import (
    BackendError,
    Finished,
    GenerationEvent,
    GenerationRequest,
    TokenDelta,
)
from swarmgate.protocol import ChatMessage, LoadedModel

log = logging.getLogger(__name__)

_CONNECT_TIMEOUT_S = 10.0


@dataclass
class _StreamState:
    chunks: int = 0
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    done: bool = False


class OpenAIHTTPBackend:
    name = "openai-http"

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:11434/v1",
        api_key: str = "",
        model_map: dict[str, str] | None = None,
        timeout_s: float = 300,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model_map = dict(model_map or {})
        self._api_key = api_key
        self._timeout = httpx.Timeout(timeout_s, connect=min(_CONNECT_TIMEOUT_S, timeout_s))
        self._client: httpx.AsyncClient | None = None
        self._loaded: set[str] = set()

    def _server_model(self, model_id: str) -> str:
        return self.model_map.get(model_id, model_id)

    def _http(self) -> httpx.AsyncClient:
        # Created on first use so a backend that is never used never opens a pool.
        if self._client is None:
            headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
            self._client = httpx.AsyncClient(
                timeout=self._timeout,
                headers=headers,
                limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
            )
        return self._client

    async def load(self, model_ids: list[str]) -> list[LoadedModel]:
        available = await self._list_server_models()
        loaded = [m for m in model_ids if self._server_model(m) in available]
        missing = [m for m in model_ids if m not in loaded]
        if not loaded:
            raise BackendError(
                f"the server at {self.base_url} has none of the requested models "
                f"{missing!r} (it lists {sorted(available)!r})",
                code="MODEL_NOT_AVAILABLE",
            )
        if missing:
            log.warning("server at %s lacks models %s; serving the rest", self.base_url, missing)
        self._loaded = set(loaded)
        return [LoadedModel(id=model_id) for model_id in loaded]

    async def _list_server_models(self) -> set[str]:
        url = f"{self.base_url}/models"
        try:
            response = await self._http().get(url)
            response.raise_for_status()
            data = response.json()
        except httpx.HTTPStatusError as exc:
            raise BackendError(
                f"GET {url} answered {exc.response.status_code}", code="UPSTREAM_HTTP_ERROR"
            ) from exc
        except httpx.HTTPError as exc:
            raise BackendError(
                f"cannot reach {url}: {type(exc).__name__}", code="UPSTREAM_UNREACHABLE"
            ) from exc
        except ValueError as exc:
            raise BackendError(
                f"GET {url} did not return JSON", code="UPSTREAM_BAD_RESPONSE"
            ) from exc
        items = data.get("data") if isinstance(data, dict) else None
        if not isinstance(items, list):
            raise BackendError(f"GET {url} returned no model list", code="UPSTREAM_BAD_RESPONSE")
        return {
            item["id"]
            for item in items
            if isinstance(item, dict) and isinstance(item.get("id"), str)
        }

    def _request_body(self, request: GenerationRequest) -> dict[str, Any]:
        params = request.params
        body: dict[str, Any] = {
            "model": self._server_model(request.model),
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        return body

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        if request.model not in self._loaded:
            raise BackendError(f"model {request.model!r} is not loaded", code="MODEL_NOT_LOADED")
        if request.continue_final:
            # The chat API has no portable way to continue an assistant turn (servers
            # that ignore a trailing assistant message would start a new answer), so
            # this device declines and the gateway asks another.
            raise BackendError(
                "this backend cannot continue a partial answer", code="CONTINUATION_UNSUPPORTED"
            )
        url = f"{self.base_url}/chat/completions"
        state = _StreamState()
        try:
            # Leaving this block, by finishing, aclose() or cancellation, closes the stream.
            async with self._http().stream("POST", url, json=self._request_body(request)) as resp:
                if resp.status_code >= 400:
                    await resp.aclose()
                    raise BackendError(
                        f"POST {url} answered {resp.status_code} {resp.reason_phrase}",
                        code="UPSTREAM_HTTP_ERROR",
                    )
                async for payload in _sse_data(resp):
                    if payload == "[DONE]":
                        state.done = True
                        break
                    text = _apply_chunk(state, payload)
                    if text:
                        state.chunks += 1
                        yield TokenDelta(text, tokens=1)
        except httpx.TimeoutException as exc:
            raise BackendError(f"POST {url} timed out", code="UPSTREAM_TIMEOUT") from exc
        except httpx.HTTPError as exc:
            raise BackendError(
                f"POST {url} failed: {type(exc).__name__}", code="UPSTREAM_UNREACHABLE"
            ) from exc
        if not state.done and state.finish_reason is None:
            raise BackendError(f"POST {url}: stream ended early", code="UPSTREAM_BAD_RESPONSE")
        yield _finished(state, request.messages)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


async def _sse_data(response: httpx.Response) -> AsyncIterator[str]:
    """The ``data`` of each server-sent event; multi-line data is joined with newlines."""
    lines: list[str] = []
    async for line in response.aiter_lines():
        if not line:
            if lines:
                yield "\n".join(lines)
                lines = []
            continue
        if line.startswith(":"):
            continue  # a comment, used as a keep-alive
        field, _, value = line.partition(":")
        if field == "data":
            lines.append(value.removeprefix(" "))
    if lines:
        yield "\n".join(lines)


def _apply_chunk(state: _StreamState, payload: str) -> str:
    """Record a chunk's finish reason and usage; return its content text."""
    try:
        chunk = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise BackendError(
            "the server sent a chunk that is not JSON", code="UPSTREAM_BAD_RESPONSE"
        ) from exc
    if not isinstance(chunk, dict):
        raise BackendError(
            "the server sent a chunk that is not an object", code="UPSTREAM_BAD_RESPONSE"
        )
    if chunk.get("error"):
        raise BackendError("the server reported an error mid-stream", code="UPSTREAM_ERROR")
    usage = chunk.get("usage")
    if isinstance(usage, dict):
        state.usage = usage
    choices = chunk.get("choices") or []
    if not choices or not isinstance(choices[0], dict):
        return ""
    choice = choices[0]
    if choice.get("finish_reason"):
        state.finish_reason = str(choice["finish_reason"])
    delta = choice.get("delta") or {}
    text = delta.get("content") if isinstance(delta, dict) else None
    return text if isinstance(text, str) else ""


def _finished(state: _StreamState, messages: list[ChatMessage]) -> Finished:
    reason: Literal["stop", "length"] = "length" if state.finish_reason == "length" else "stop"
    usage = state.usage or {}
    prompt_tokens = usage.get("prompt_tokens")
    completion_tokens = usage.get("completion_tokens")
    return Finished(
        finish_reason=reason,
        prompt_tokens=prompt_tokens
        if isinstance(prompt_tokens, int) and prompt_tokens >= 0
        else estimate_prompt_tokens(messages),
        completion_tokens=completion_tokens
        if isinstance(completion_tokens, int) and completion_tokens >= 0
        else state.chunks,
    )


def estimate_prompt_tokens(messages: list[ChatMessage]) -> int:
    # About four characters per token, plus the chat template's per-message framing.
    return 3 + sum(4 + (len(m.content) + 3) // 4 for m in messages)
