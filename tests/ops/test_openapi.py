"""The OpenAPI document shows the request bodies of endpoints that validate their own."""

from __future__ import annotations

import pytest

from tests.conftest import LiveGateway


@pytest.mark.parametrize(
    ("path", "method", "field"),
    [
        ("/v1/chat/completions", "post", "orchestration"),
        ("/v1/chat/completions", "post", "conversation_id"),
        ("/v1/conversations", "post", "system"),
        ("/v1/conversations/{conversation_id}/messages", "post", "messages"),
        ("/v1/conversations/{conversation_id}", "patch", "title"),
        ("/v1/workflows/estimate", "post", "workflow"),
        ("/v1/vault", "post", "apiKey"),
        ("/v1/keys", "post", "name"),
        ("/v1/auth/signup", "post", "email"),
    ],
)
async def test_request_bodies_are_described(
    live: LiveGateway, path: str, method: str, field: str
) -> None:
    async with live.client() as client:
        document = (await client.get("/openapi.json")).json()
    schema = document["paths"][path][method]["requestBody"]["content"]["application/json"]["schema"]
    assert field in schema["properties"]


async def test_answers_are_described_as_the_gateway_sends_them(live: LiveGateway) -> None:
    async with live.client() as client:
        document = (await client.get("/openapi.json")).json()
    error = {"$ref": "#/components/schemas/Error"}
    assert document["components"]["schemas"]["Error"]["required"] == ["error"]
    chat = document["paths"]["/v1/chat/completions"]["post"]["responses"]
    for status in ("400", "401", "402", "404", "413", "429", "503"):
        assert chat[status]["content"]["application/json"]["schema"] == error
    ok = document["paths"]["/v1/keys"]["get"]["responses"]["200"]
    assert ok["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ApiKeyList"
    }
    metrics = document["paths"]["/metrics"]["get"]["responses"]
    assert "text/plain" in metrics["200"]["content"]
    assert set(metrics) == {"200"}
    assert set(document["paths"]["/readyz"]["get"]["responses"]) == {"200", "503"}
