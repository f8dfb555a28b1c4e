"""Cloud upstreams that speak the OpenAI API (OpenAI, OpenRouter, Together, Groq, Cloudflare
Workers AI's OpenAI-compatible endpoint, or any base URL).

The operator configures them (``SWARMGATE_UPSTREAMS``, a JSON list of ``{"name",
"base_url", "api_key", "timeout_s", "stream"}``; ``stream: false`` for an upstream that
cannot stream); the catalog says which upstream serves a cloud or
hybrid model under which name. One pooled HTTP client per upstream. A call runs through
the model's upstreams in order — with the account's own vault key for an upstream where
it has one — and fails over on rate limits, timeouts, server errors and refused keys;
when all fail, the error of the last one says what went wrong.

A streamed answer is relayed as it arrives: the upstream's chunks that arrive together
(in one read) go on as one delta, so a fast upstream costs one event, not one per token.

Usage comes from the upstream. When it reports none (or -1), the gateway counts tokens
itself with ``estimate_tokens`` — an approximation, never a negative number.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
from pydantic import BaseModel, ConfigDict, Field

from swarmgate.catalog import CatalogModel
from swarmgate.errors import (
    CloudUnavailable,
    SwarmgateError,
    UpstreamAddressRefused,
    UpstreamAuthFailed,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTimeout,
)
from swarmgate.protocol import ChatMessage, Delta, Done, SamplingParams, Usage
from swarmgate.upstream_http import HttpClient, Response, UpstreamHttpError, UpstreamHttpTimeout

log = logging.getLogger("swarmgate.upstreams")
_MAX_ERROR_BODY = 1024 * 1024  # an error answer is read (to keep its connection) up to this


class UpstreamConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64)
    base_url: str = Field(min_length=1, max_length=500)
    api_key: str = Field(default="", repr=False)
    timeout_s: float = Field(default=60.0, gt=0)
    # False for an upstream that cannot stream: it is asked with ``stream: false`` and its
    # whole answer is relayed as one delta. (An upstream that answers a streaming request
    # with a plain JSON completion is understood either way.)
    stream: bool = True


_WORDS = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def estimate_tokens(text: str) -> int:
    """Roughly what a BPE tokenizer makes of ``text``: words and punctuation marks, with
    long words counting extra. Used only when an upstream reports no usage."""
    return sum(1 + len(piece) // 8 for piece in _WORDS.findall(text))


def estimate_prompt_tokens(messages: tuple[ChatMessage, ...]) -> int:
    return sum(4 + estimate_tokens(m.content) for m in messages) + 3


@dataclass
class Upstream:
    config: UpstreamConfig
    client: HttpClient

    @property
    def name(self) -> str:
        return self.config.name


@dataclass
class CloudAttempt:
    upstream: str
    byok: bool
    outcome: str
    error_code: str | None
    duration_ms: int


@dataclass
class CloudRun:
    """One request's run across upstreams (mirrors a device Execution's record)."""

    model: CatalogModel
    # Whether the client streams: one that does not gets a whole answer from the upstream
    # too, which is one JSON document to read instead of a frame per token.
    streamed: bool = True
    attempts: list[CloudAttempt] = field(default_factory=list)
    upstream: str | None = None
    byok: bool = False


KeyLookup = Callable[[str], Awaitable[tuple[str, str | None] | None]]


Resolver = Callable[[str, int], Awaitable[list[str]]]


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


@dataclass(frozen=True, slots=True)
class Pinned:
    """A URL whose host was replaced by the address that was checked."""

    url: str
    host: str  # for the Host header
    extensions: dict[str, Any]  # for TLS: the name the certificate must carry


class AddressGuard:
    """Developers' own base URLs (from the vault) may point the gateway only at public
    addresses, unless the operator allows private ones.

    ``pin`` resolves the host, refuses loopback, private, link-local and other non-global
    addresses, and returns the URL with the checked address in place of the host — the
    Host header and the TLS server name keep the original name — so a DNS answer that
    changes between the check and the connection (rebinding) cannot redirect the call.
    Answers are cached for ``ttl_s``."""

    def __init__(
        self,
        *,
        allow_private: bool = False,
        resolver: Resolver = system_resolver,
        ttl_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.allow_private = allow_private
        self._resolver = resolver
        self._ttl_s = ttl_s
        self._clock = clock
        self._cache: dict[tuple[str, int], tuple[float, list[str]]] = {}

    async def pin(self, url: str) -> Pinned:
        parts = urlsplit(url)
        host = parts.hostname
        if parts.scheme not in ("http", "https") or not host:
            raise UpstreamAddressRefused(f"{url!r} is not an http(s) URL.")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        addresses = await self._addresses(host, port)
        chosen = None
        for text in addresses:
            address = ipaddress.ip_address(text.split("%", 1)[0])
            if not self.allow_private and not address.is_global:
                raise UpstreamAddressRefused(
                    f"The base URL's host {host!r} resolves to a non-public address; this "
                    "gateway does not call private, loopback or link-local hosts for you."
                )
            chosen = chosen or address
        if chosen is None:
            raise UpstreamAddressRefused(f"The base URL's host {host!r} does not resolve.")
        literal = f"[{chosen}]" if chosen.version == 6 else str(chosen)
        netloc = f"{literal}:{parts.port}" if parts.port else literal
        named = f"{host}:{parts.port}" if parts.port else host
        extensions: dict[str, Any] = {}
        if parts.scheme == "https" and not _is_address(host):
            extensions["sni_hostname"] = host
        return Pinned(
            url=urlunsplit((parts.scheme, netloc, parts.path, parts.query, "")),
            host=named,
            extensions=extensions,
        )

    async def _addresses(self, host: str, port: int) -> list[str]:
        if _is_address(host):
            return [host]
        now = self._clock()
        cached = self._cache.get((host, port))
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            found = await self._resolver(host, port)
        except OSError:
            found = []
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[(host, port)] = (now + self._ttl_s, found)
        return found


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class Upstreams:
    def __init__(self, configs: list[UpstreamConfig], *, allow_private_urls: bool = False) -> None:
        self.guard = AddressGuard(allow_private=allow_private_urls)
        self._by_name: dict[str, Upstream] = {}
        for config in configs:
            client = HttpClient(
                timeout_s=config.timeout_s, connect_timeout_s=min(10.0, config.timeout_s)
            )
            self._by_name[config.name] = Upstream(config, client)

    def names(self) -> list[str]:
        return list(self._by_name)

    def serves(self, model: CatalogModel) -> bool:
        return any(u.upstream in self._by_name for u in model.upstreams)

    async def aclose(self) -> None:
        for upstream in self._by_name.values():
            await upstream.client.aclose()

    def _routes(self, model: CatalogModel) -> list[tuple[Upstream, str]]:
        routes = [
            (self._by_name[u.upstream], u.model)
            for u in model.upstreams
            if u.upstream in self._by_name
        ]
        if not routes:
            raise CloudUnavailable(
                f"No cloud upstream is configured for '{model.id}' on this gateway."
            )
        return routes

    async def stream(
        self,
        run: CloudRun,
        messages: tuple[ChatMessage, ...],
        params: SamplingParams,
        vault_key: KeyLookup,
        job_id: str,
    ) -> AsyncGenerator[Delta | Done, None]:
        """Deltas then a Done, from the first upstream that answers. Fails over between
        upstreams until the first delta is out; after that an error ends the stream."""
        last: SwarmgateError | None = None
        for upstream, upstream_model in self._routes(run.model):
            own = await vault_key(upstream.name)
            started = time.monotonic()
            attempt = CloudAttempt(upstream.name, own is not None, "running", None, 0)
            run.attempts.append(attempt)
            delivered = False
            try:
                async for event in self._call(
                    upstream,
                    upstream_model,
                    own,
                    messages,
                    params,
                    job_id,
                    stream=upstream.config.stream and run.streamed,
                ):
                    if isinstance(event, Delta):
                        delivered = True
                    elif isinstance(event, Done):
                        run.upstream, run.byok = upstream.name, own is not None
                        attempt.outcome = "succeeded"
                    yield event
                return
            except UpstreamError as exc:
                attempt.outcome, attempt.error_code = "failed", exc.code
                last = exc
                log.info(
                    "upstream failed",
                    extra={"upstream": upstream.name, "code": exc.code, "byok": own is not None},
                )
                if delivered:
                    raise
            finally:
                attempt.duration_ms = int((time.monotonic() - started) * 1000)
                if attempt.outcome == "running":
                    attempt.outcome = "cancelled"
        assert last is not None
        raise last

    async def _call(
        self,
        upstream: Upstream,
        upstream_model: str,
        own: tuple[str, str | None] | None,
        messages: tuple[ChatMessage, ...],
        params: SamplingParams,
        job_id: str,
        *,
        stream: bool,
    ) -> AsyncGenerator[Delta | Done, None]:
        api_key, base_url = (own[0], own[1]) if own is not None else (upstream.config.api_key, None)
        root = base_url or upstream.config.base_url
        url = f"{root.rstrip('/')}/chat/completions"
        body: dict[str, Any] = {
            "model": upstream_model,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stream": stream,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        if params.stop:
            body["stop"] = params.stop
        if params.seed is not None:
            body["seed"] = params.seed
        headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        server_hostname: str | None = None
        if base_url:  # a developer's own base URL: only to the public address checked
            # Behind a proxy (HTTPS_PROXY and the like) the gateway connects to the proxy
            # and asks it for this checked address (CONNECT address:port, or an absolute
            # http://address/ target), so the check still bounds where the call goes — by
            # what the gateway's resolver says of the name, not the proxy's. NO_PROXY is
            # then matched against the address, not the name.
            pinned = await self.guard.pin(url)
            url, server_hostname = pinned.url, pinned.extensions.get("sni_hostname")
            headers["Host"] = pinned.host
        parts: list[str] = []
        usage: dict[str, Any] | None = None
        finish = "stop"
        try:
            async with upstream.client.post(
                url, orjson.dumps(body), headers, server_hostname=server_hostname
            ) as resp:
                if resp.status >= 400:
                    await resp.read(limit=_MAX_ERROR_BODY)
                    raise _http_error(upstream.name, resp, own is not None)
                streamed = resp.headers.get("content-type", "").startswith("text/event-stream")
                if not streamed:
                    whole, finish, usage = _whole_answer(upstream.name, await resp.read())
                    if whole:
                        parts.append(whole)
                        yield Delta(type="delta", job_id=job_id, text=whole)
                else:
                    ended = False
                    async for lines in resp.line_batches():
                        # Read to the end of the body even after [DONE]: only a connection
                        # whose answer was read whole goes back to the pool.
                        if ended:
                            continue
                        read = _read_chunks(lines)
                        ended = read.ended
                        if read.usage is not None:
                            usage = read.usage
                        if read.finish_reason is not None:
                            finish = "length" if read.finish_reason == "length" else "stop"
                        if read.pieces:
                            # The chunks that arrived together go on as one delta.
                            text = "".join(read.pieces)
                            parts.append(text)
                            yield Delta(
                                type="delta", job_id=job_id, text=text, tokens=len(read.pieces)
                            )
        except UpstreamHttpTimeout as exc:
            raise UpstreamTimeout(
                f"The cloud upstream '{upstream.name}' did not answer in time."
            ) from exc
        except (UpstreamHttpError, orjson.JSONDecodeError) as exc:
            if isinstance(exc, UpstreamHttpError):
                # For the operator (a refused proxy tunnel, a connection refused): the
                # client's own message names no address. The text is the client's own,
                # with at most a status or header line quoted; never a body.
                log.warning("the cloud upstream %s failed: %s", upstream.name, exc)
            raise UpstreamError(
                f"The cloud upstream '{upstream.name}' failed: {type(exc).__name__}."
            ) from exc
        yield Done(
            type="done",
            job_id=job_id,
            finish_reason="length" if finish == "length" else "stop",
            usage=_usage(usage, messages, "".join(parts)),
        )


@dataclass(slots=True)
class _ChunksRead:
    """What some lines of a streamed chat completion said."""

    pieces: list[str] = field(default_factory=list)  # the content, one piece per chunk
    usage: dict[str, Any] | None = None  # the last usage reported
    finish_reason: str | None = None  # the last finish reason given
    ended: bool = False  # [DONE] was among the lines (those after it are not read)


def _read_chunks(lines: list[str]) -> _ChunksRead:
    """The chat-completion chunks in ``lines`` of server-sent events."""
    read = _ChunksRead()
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            read.ended = True
            break
        chunk = orjson.loads(data)
        if not isinstance(chunk, dict):
            continue
        if isinstance(chunk.get("usage"), dict):
            read.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            text = (choice.get("delta") or {}).get("content")
            if text and isinstance(text, str):
                read.pieces.append(text)
            if choice.get("finish_reason"):
                read.finish_reason = choice["finish_reason"]
    return read


def _whole_answer(name: str, raw: bytes) -> tuple[str, str, dict[str, Any] | None]:
    """(text, finish reason, usage) of a non-streamed chat completion."""
    try:
        payload = orjson.loads(raw)
        choice = payload["choices"][0]
        text = choice["message"].get("content") or ""
        if not isinstance(text, str):
            raise TypeError("content is not text")
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise UpstreamError(
            f"The cloud upstream '{name}' answered something that is not a chat completion."
        ) from exc
    finish = "length" if choice.get("finish_reason") == "length" else "stop"
    usage = payload.get("usage")
    return text, finish, usage if isinstance(usage, dict) else None


def _usage(reported: dict[str, Any] | None, messages: tuple[ChatMessage, ...], text: str) -> Usage:
    prompt = completion = -1
    if reported is not None:
        prompt = _count(reported.get("prompt_tokens"))
        completion = _count(reported.get("completion_tokens"))
    if prompt < 0:
        prompt = estimate_prompt_tokens(messages)
    if completion < 0:
        completion = estimate_tokens(text)
    return Usage(prompt_tokens=prompt, completion_tokens=completion)


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else -1


def _http_error(name: str, resp: Response, byok: bool) -> UpstreamError:
    status = resp.status
    whose = "your vault key" if byok else "the gateway's key"
    if status in (401, 403):
        return UpstreamAuthFailed(
            f"The cloud upstream '{name}' refused {whose} (HTTP {status})."
            + (" Update it with POST /v1/vault." if byok else "")
        )
    if status == 429:
        retry = resp.headers.get("retry-after")
        seconds = int(float(retry)) if retry and retry.replace(".", "", 1).isdigit() else None
        return UpstreamRateLimited(
            f"The cloud upstream '{name}' is rate limiting {whose}.", retry_after=seconds
        )
    return UpstreamError(f"The cloud upstream '{name}' answered HTTP {status}.")
