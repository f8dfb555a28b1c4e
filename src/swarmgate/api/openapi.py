"""The OpenAPI document, made to say what the gateway really answers.

FastAPI describes each route from its signature. Ours return ``Response`` objects built
by hand (orjson, the error envelope), so the generated document would claim a JSON
*string* for every success and a FastAPI-style 422 for bad input. This module rewrites
those parts once, when the document is first asked for: successes are JSON objects (or
Prometheus text), and every status the error handler can produce is documented with the
OpenAI-style error envelope.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "code": {"type": ["string", "null"]},
                "param": {"type": ["string", "null"]},
                "retry_after": {"type": "integer"},
            },
        }
    },
}

# What ``api/errors.py`` can answer on any API route (errors.py has the whole tree).
ERROR_STATUSES = {
    "400": "Invalid request: a malformed body, a wrong type, an unknown field",
    "401": "Missing, invalid, expired or revoked credentials",
    "402": "Not enough credit, or the key's daily spend cap reached",
    "403": "Not allowed for this key, account or device",
    "404": "No such resource on this account",
    "405": "Method not allowed",
    "409": "Conflicts with the resource's state, or a request with this Idempotency-Key runs",
    "413": "The body is larger than the gateway accepts",
    "422": "The Idempotency-Key was used with a different request",
    "429": "Rate limited: see Retry-After",
    "502": "A device or upstream failed after every retry",
    "503": "No device or upstream can serve now, or a feature is not configured",
    "504": "A device or upstream timed out",
}
_PLAIN_TEXT = {"/metrics"}
# The process answers these itself, before any authentication or body.
_PROBES = {"/healthz": (), "/readyz": ("503",), "/metrics": ()}


def _error_response(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def describe_responses(document: dict[str, Any]) -> dict[str, Any]:
    """Rewrites every operation's responses in place; returns the document."""
    document.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    for path, item in document.get("paths", {}).items():
        for method, operation in item.items():
            if method not in ("get", "post", "put", "patch", "delete"):
                continue
            responses: dict[str, Any] = operation.setdefault("responses", {})
            for status, response in list(responses.items()):
                if not status.startswith("2"):
                    continue
                if path in _PLAIN_TEXT:
                    response["content"] = {"text/plain": {"schema": {"type": "string"}}}
                else:
                    content = response.setdefault("content", {})
                    content["application/json"] = {"schema": {"type": "object"}}
            statuses = _PROBES.get(path, tuple(ERROR_STATUSES))
            for status in statuses:
                responses[status] = _error_response(ERROR_STATUSES[status])
            if path in _PROBES:
                responses.pop("422", None)
    return document


def install_openapi(app: FastAPI) -> None:
    """Builds the document once, on first request, with the responses described."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            app.openapi_schema = describe_responses(document)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
