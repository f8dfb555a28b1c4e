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
