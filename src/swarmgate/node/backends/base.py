"""The one seam between a node and whatever runs its models.

A backend loads models and turns a ``GenerationRequest`` into an async iterator
of ``TokenDelta`` items followed by exactly one ``Finished``. Cancelling the
consuming task (or calling ``aclose()`` on the iterator) must stop the work
promptly: the llama.cpp backend checks a flag between tokens.

Backends are found by name in ``BACKENDS``; the built-ins register themselves
the same way a third-party one would.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from swarmgate.protocol import ChatMessage, LoadedModel, SamplingParams


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    job_id: str
    model: str
    messages: list[ChatMessage]
    params: SamplingParams
    # Non-streamed jobs may be generated in one go; streamed ones yield per token.
    stream: bool = True
    # The last message is a partial assistant answer: generate its continuation only.
    continue_final: bool = False


@dataclass(frozen=True, slots=True)
class TokenDelta:
    text: str
    tokens: int = 1


@dataclass(frozen=True, slots=True)
class Finished:
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int


GenerationEvent = TokenDelta | Finished


class BackendError(Exception):
    """A backend could not serve a job; the node reports it and the gateway fails over."""

    def __init__(self, message: str, code: str = "BACKEND_ERROR") -> None:
        super().__init__(message)
        self.code = code


class DropConnection(Exception):
    """Raised by a (simulated) backend to make the node drop its gateway connection."""


class Backend(Protocol):
    name: str

    async def load(self, model_ids: list[str]) -> list[LoadedModel]:
        """Load the models and return what the node may announce (id and artifact sha256)."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]: ...

    async def close(self) -> None: ...


@dataclass
class BackendSpec:
    name: str
    factory: Callable[..., Backend]
    description: str = ""
    options: dict[str, Any] = field(default_factory=dict)


BACKENDS: dict[str, BackendSpec] = {}


def register_backend(
    name: str, description: str = ""
) -> Callable[[Callable[..., Backend]], Callable[..., Backend]]:
    def decorator(factory: Callable[..., Backend]) -> Callable[..., Backend]:
        BACKENDS[name] = BackendSpec(name=name, factory=factory, description=description)
        return factory

    return decorator


def create_backend(name: str, **options: Any) -> Backend:
    # Built-ins register on import; importing here keeps the registry lazy and cheap.
    from swarmgate.node.backends import builtin  # noqa: F401

    try:
        spec = BACKENDS[name]
    except KeyError:
        known = ", ".join(sorted(BACKENDS))
        raise ValueError(f"unknown backend {name!r}; known backends: {known}") from None
    return spec.factory(**options)
