"""The OpenAPI document, made to say what the gateway really answers.

FastAPI describes each route from its signature. Ours return ``Response`` objects built
by hand (orjson, the error envelope), so the generated document would claim a JSON
*string* for every success and a FastAPI-style 422 for bad input. This module rewrites
those parts once, when the document is first asked for: each success gets the schema of
what its handler sends (``response_schemas.py``; server-sent events too, where the route
streams), and every status the error handler can produce is documented with the
OpenAI-style error envelope.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from swarmgate.api.response_schemas import SCHEMAS, Schema, ref

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
# A route added without an entry in SUCCESS is still documented, as some JSON object;
# tests/ops/test_openapi_schemas.py refuses that. No route answers free-form JSON today.
UNDESCRIBED: dict[str, Any] = {"type": "object"}


# (path, method, status) → the component of response_schemas.SCHEMAS its JSON body is.
SUCCESS: dict[tuple[str, str, str], str] = {
    ("/healthz", "get", "200"): "Health",
    ("/readyz", "get", "200"): "Readiness",
    ("/v1/chat/completions", "post", "200"): "ChatCompletion",
    ("/v1/inference", "post", "200"): "Inference",
    ("/v1/jobs", "post", "202"): "QueuedJob",
    ("/v1/jobs/{job_id}", "get", "200"): "Job",
    ("/v1/models", "get", "200"): "ModelList",
    ("/v1/models/{model_id}", "get", "200"): "Model",
    ("/v1/nodes/catalog", "get", "200"): "NodeModelList",
    ("/v1/auth/signup", "post", "201"): "SignUp",
    ("/v1/auth/signin", "post", "200"): "Session",
    ("/v1/auth/signout", "post", "200"): "SignOut",
    ("/v1/account", "get", "200"): "Account",
    ("/v1/keys", "post", "201"): "ApiKeyWithSecret",
    ("/v1/keys", "get", "200"): "ApiKeyList",
    ("/v1/keys/{key_id}", "get", "200"): "ApiKey",
    ("/v1/keys/{key_id}", "patch", "200"): "ApiKey",
    ("/v1/keys/{key_id}", "delete", "200"): "ApiKey",
    ("/v1/keys/{key_id}/rotate", "post", "201"): "RotatedApiKey",
    ("/v1/billing/checkout", "post", "200"): "CheckoutSession",
    ("/v1/billing/stripe/webhook", "post", "200"): "StripeReceipt",
    ("/v1/usage", "get", "200"): "Usage",
    ("/v1/provider/earnings", "get", "200"): "ProviderEarnings",
    ("/v1/provider/payouts", "post", "201"): "Payout",
    ("/v1/provider/payouts", "get", "200"): "PayoutList",
    ("/v1/provider/payouts/{payout_id}", "get", "200"): "Payout",
    ("/v1/provider/payouts/{payout_id}/cancel", "post", "200"): "Payout",
    ("/v1/provider/devices/{device_id}", "get", "200"): "ProviderDevice",
    ("/v1/provider/devices/{device_id}/prices", "put", "200"): "DeviceTrust",
    ("/v1/nodes/earnings", "get", "200"): "NodeEarnings",
    ("/v1/nodes/trust", "get", "200"): "DeviceTrust",
    ("/v1/nodes/attestation/nonce", "post", "200"): "AttestationNonce",
    ("/v1/nodes/attestation", "post", "200"): "Attested",
    ("/v1/vault", "post", "201"): "VaultEntry",
    ("/v1/vault", "get", "200"): "VaultLookup",
    ("/v1/vault", "delete", "200"): "VaultDeleted",
    ("/v1/webhooks", "post", "201"): "WebhookEndpointWithSecret",
    ("/v1/webhooks", "get", "200"): "WebhookEndpointList",
    ("/v1/webhooks/{endpoint_id}", "delete", "200"): "WebhookEndpointDeleted",
    ("/v1/webhooks/{endpoint_id}/deliveries", "get", "200"): "WebhookDeliveryList",
    ("/v1/conversations", "post", "200"): "Conversation",
    ("/v1/conversations", "get", "200"): "ConversationPage",
    ("/v1/conversations/{conversation_id}", "get", "200"): "ConversationDetail",
    ("/v1/conversations/{conversation_id}", "patch", "200"): "Conversation",
    ("/v1/conversations/{conversation_id}", "delete", "200"): "ConversationDeleted",
    ("/v1/conversations/{conversation_id}/messages", "post", "200"): "AddedMessages",
    ("/v1/workflows", "get", "200"): "WorkflowPage",
    ("/v1/workflows/{workflow_id}", "get", "200"): "WorkflowDetail",
    ("/v1/workflows/estimate", "post", "200"): "WorkflowEstimate",
    ("/admin/accounts", "post", "201"): "AdminAccount",
    ("/admin/accounts", "get", "200"): "AdminAccountList",
    ("/admin/accounts/{account_id}/keys", "post", "201"): "AdminCreatedKey",
    ("/admin/accounts/{account_id}/top-up", "post", "200"): "TopUp",
    ("/admin/devices", "post", "201"): "AdminCreatedDevice",
    ("/admin/devices", "get", "200"): "RegisteredDeviceList",
    ("/admin/models", "get", "200"): "ModelList",
    ("/admin/payouts", "get", "200"): "PayoutList",
    ("/admin/payouts/{payout_id}/approve", "post", "200"): "Payout",
    ("/admin/payouts/{payout_id}/reject", "post", "200"): "Payout",
    ("/admin/payouts/{payout_id}/paid", "post", "200"): "Payout",
    ("/admin/devices/{device_id}/trust", "get", "200"): "DeviceTrust",
    ("/admin/devices/{device_id}/clear", "post", "200"): "DeviceTrust",
    ("/admin/devices/{device_id}/verify", "post", "200"): "DeviceTrust",
}

# Operations that answer with server-sent events when the request sets "stream": true;
# each event's data is the named component (or the error envelope, should the run fail
# after the stream has started), and the last is "[DONE]".
STREAMED: dict[tuple[str, str], str] = {
    ("/v1/chat/completions", "post"): "ChatCompletionChunk",
    ("/v1/inference", "post"): "InferenceChunk",
}


def event_stream(chunk: str) -> Schema:
    """The ``text/event-stream`` media type of an operation whose events are ``chunk``."""
    return {
        "schema": {
            "type": "string",
            "description": (
                f"Server-sent events. Each `data:` line holds one {chunk} as JSON, or the "
                "error envelope if the run fails once the stream has begun; the stream "
                "ends with `data: [DONE]`."
            ),
        },
        # Tools that read the events' shapes find them here.
        "x-event-data": {"oneOf": [ref(chunk), ref("Error")]},
    }


def _error_response(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _success_content(path: str, method: str, status: str) -> dict[str, Any]:
    if path in _PLAIN_TEXT:
        return {"text/plain": {"schema": {"type": "string"}}}
    name = SUCCESS.get((path, method, status))
    content = {"application/json": {"schema": UNDESCRIBED if name is None else ref(name)}}
    chunk = STREAMED.get((path, method))
    if chunk is not None:
        content["text/event-stream"] = event_stream(chunk)
    return content


def _add_schemas(schemas: dict[str, Any], new: dict[str, Any]) -> None:
    for name, schema in new.items():
        if schemas.setdefault(name, schema) != schema:
            raise ValueError(f"two different schemas are named {name!r}")


def hoist_definitions(document: dict[str, Any], schemas: dict[str, Any]) -> None:
    """Request bodies that routes read themselves are pydantic's schemas, with their own
    ``$defs`` and ``#/$defs/…`` references. A reader of the document resolves those
    against the document, where there are none; so the definitions move to
    components/schemas and their references follow."""

    def visit(node: Any) -> None:
        if isinstance(node, list):
            for child in node:
                visit(child)
            return
        if not isinstance(node, dict):
            return
        definitions = node.pop("$defs", {})
        for definition in definitions.values():
            visit(definition)
        _add_schemas(schemas, definitions)
        target = node.get("$ref")
        if isinstance(target, str) and target.startswith("#/$defs/"):
            node["$ref"] = "#/components/schemas/" + target.removeprefix("#/$defs/")
        for child in node.values():
            visit(child)

    visit(document.get("paths", {}))


def describe_responses(document: dict[str, Any]) -> dict[str, Any]:
    """Rewrites every operation's responses in place; returns the document."""
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    _add_schemas(schemas, {"Error": ERROR_SCHEMA, **SCHEMAS})
    hoist_definitions(document, schemas)
    for path, item in document.get("paths", {}).items():
        for method, operation in item.items():
            if method not in ("get", "post", "put", "patch", "delete"):
                continue
            responses: dict[str, Any] = operation.setdefault("responses", {})
            for status, response in list(responses.items()):
                if status.startswith("2"):
                    response["content"] = _success_content(path, method, status)
            statuses = _PROBES.get(path, tuple(ERROR_STATUSES))
            for status in statuses:
                responses[status] = _error_response(ERROR_STATUSES[status])
            if path in _PROBES:
                responses.pop("422", None)
    # Not ready is not an error: the probe answers with its status, as when ready.
    readiness = document.get("paths", {}).get("/readyz", {}).get("get")
    if readiness is not None:
        readiness["responses"]["503"] = {
            "description": "Starting, or the database or Redis is unreachable",
            "content": {"application/json": {"schema": ref("Readiness")}},
        }
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
