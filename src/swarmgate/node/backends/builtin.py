"""Registers the built-in backends. Heavy imports (llama_cpp) happen only when one is created."""

from __future__ import annotations

from typing import Any

from swarmgate.node.backends.base import Backend, register_backend


@register_backend("sim", "a simulated device for demos, load and fault tests")
def _sim(**options: Any) -> Backend:
    from swarmgate.node.backends.sim import SimBackend, SimConfig

    return SimBackend(SimConfig(**options))


@register_backend("llama-cpp", "llama.cpp in-process through llama-cpp-python")
def _llama_cpp(**options: Any) -> Backend:
    from swarmgate.node.backends.llama_cpp import LlamaCppBackend

    return LlamaCppBackend(**options)


@register_backend("openai-http", "a local OpenAI-compatible server (Ollama, llama-server, vLLM)")
def _openai_http(**options: Any) -> Backend:
    from swarmgate.node.backends.openai_http import OpenAIHTTPBackend

    return OpenAIHTTPBackend(**options)
