"""Every bad input gets a clear OpenAI-style error with the right status; the next request works."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import update

from swarmgate.accounts import service
from swarmgate.store.tables import api_keys
from tests.conftest import MODEL, LiveGateway

GOOD: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}]}


def body(**changes: Any) -> dict[str, Any]:
    out = dict(GOOD)
    for key, value in changes.items():
        if value is ...:
            out.pop(key, None)
        else:
            out[key] = value
    return out


# (case id, raw body or JSON dict, status, code, param)
CASES: list[tuple[str, bytes | dict[str, Any], int, str, str | None]] = [
    ("malformed json", b'{"model": "x", ', 400, "INVALID_REQUEST", None),
    ("not json at all", b"hello there", 400, "INVALID_REQUEST", None),
    ("empty body", b"", 400, "INVALID_REQUEST", None),
    ("json array", b"[1, 2, 3]", 400, "INVALID_REQUEST", None),
    ("missing model", body(model=...), 400, "INVALID_REQUEST", "model"),
    ("unknown model", body(model="gpt-17"), 404, "MODEL_NOT_FOUND", "model"),
    ("model wrong type", body(model=42), 400, "INVALID_REQUEST", "model"),
    ("missing messages", body(messages=...), 400, "INVALID_REQUEST", "messages"),
    ("empty messages", body(messages=[]), 400, "INVALID_REQUEST", "messages"),
    ("messages not a list", body(messages="hi"), 400, "INVALID_REQUEST", "messages"),
    ("message not an object", body(messages=["hi"]), 400, "INVALID_REQUEST", "messages[0]"),
    (
        "unknown role",
        body(messages=[{"role": "wizard", "content": "x"}]),
        400,
        "INVALID_REQUEST",
        "messages[0].role",
    ),
    (
        "content wrong type",
        body(messages=[{"role": "user", "content": 5}]),
        400,
        "INVALID_REQUEST",
        "messages[0].content",
    ),
    (
        "image part",
        body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
        400,
        "INVALID_REQUEST",
        "messages[0].content[0].type",
    ),
    (
        "temperature numeric string",
        body(temperature="0.5"),
        400,
        "INVALID_REQUEST",
        "temperature",
    ),
    ("temperature string", body(temperature="hot"), 400, "INVALID_REQUEST", "temperature"),
    ("temperature too high", body(temperature=3), 400, "INVALID_REQUEST", "temperature"),
    ("top_p too high", body(top_p=1.5), 400, "INVALID_REQUEST", "top_p"),
    ("max_tokens zero", body(max_tokens=0), 400, "INVALID_REQUEST", "max_tokens"),
    ("max_tokens fraction", body(max_tokens=1.5), 400, "INVALID_REQUEST", "max_tokens"),
    ("max_tokens over context", body(max_tokens=100_000), 400, "INVALID_REQUEST", "max_tokens"),
    ("stream as string", body(stream="yes"), 400, "INVALID_REQUEST", "stream"),
    ("n=2", body(n=2), 400, "INVALID_REQUEST", "n"),
    ("five stop sequences", body(stop=["a", "b", "c", "d", "e"]), 400, "INVALID_REQUEST", "stop"),
    ("seed string", body(seed="abc"), 400, "INVALID_REQUEST", "seed"),
]


@pytest.mark.parametrize(
    ("payload", "status", "code", "param"),
    [pytest.param(p, s, c, m, id=i) for i, p, s, c, m in CASES],
)
async def test_bad_body(
    live: LiveGateway, payload: bytes | dict[str, Any], status: int, code: str, param: str | None
) -> None:
    await live.add_sim_device(length=3)
    _, key = await live.developer_key()
    async with live.client(key) as client:
        if isinstance(payload, bytes):
            response = await client.post(
                "/v1/chat/completions",
                content=payload,
                headers={"Content-Type": "application/json"},
            )
        else:
            response = await client.post("/v1/chat/completions", json=payload)
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["code"] == code
        assert error["param"] == param
        assert error["message"]
        assert set(error) >= {"message", "type", "code", "param"}
        # The gateway serves the next request normally.
        follow_up = await client.post("/v1/chat/completions", json=GOOD)
        assert follow_up.status_code == 200


async def test_oversized_body_is_refused_before_reading_it_all(live: LiveGateway) -> None:
    await live.add_sim_device(length=3)
    _, key = await live.developer_key()
    huge = "x" * (live.settings.max_body_bytes + 10)
    async with live.client(key) as client:
        response = await client.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": huge}]},
        )
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "REQUEST_TOO_LARGE"

        async def chunks():  # no Content-Length: the limit holds for chunked bodies too
            for _ in range(live.settings.max_body_bytes // 65536 + 2):
                yield b"x" * 65536

        chunked = await client.post("/v1/chat/completions", content=chunks())
        assert chunked.status_code == 413
        assert (await client.post("/v1/chat/completions", json=GOOD)).status_code == 200


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer sg_live_wrongwrongwrongwrongwrongwrong",
        "Basic dXNlcjpwYXNz",
        "Bearer sk-openai-style-key",
        "bearer " + "x" * 5000,
    ],
)
async def test_bad_keys_are_401(live: LiveGateway, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}
    async with live.client() as client:
        response = await client.post("/v1/chat/completions", json=GOOD, headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "INVALID_API_KEY"
    assert response.json()["error"]["type"] == "authentication_error"


async def test_revoked_and_expired_keys_are_401(live: LiveGateway) -> None:
    await live.add_sim_device(length=3)
    account_id, _ = await live.developer_key()
    engine = live.gateway.engine
    expired = await service.create_api_key(
        engine, account_id=account_id, expires_at=datetime.now(UTC) - timedelta(seconds=1)
    )
    revoked = await service.create_api_key(engine, account_id=account_id)
    async with engine.begin() as conn:
        await conn.execute(
            update(api_keys).where(api_keys.c.id == revoked.id).values(revoked_at=datetime.now(UTC))
        )
    for secret in (expired.secret, revoked.secret):
        async with live.client(secret) as client:
            response = await client.post("/v1/chat/completions", json=GOOD)
        assert response.status_code == 401


async def test_unknown_route_and_wrong_method_use_the_envelope(live: LiveGateway) -> None:
    _, key = await live.developer_key()
    async with live.client(key) as client:
        missing = await client.get("/v1/nothing-here")
        wrong = await client.get("/v1/chat/completions")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "NOT_FOUND"
    assert wrong.status_code == 405
    assert wrong.json()["error"]["code"] == "METHOD_NOT_ALLOWED"


async def test_inference_bad_inputs(live: LiveGateway) -> None:
    _, key = await live.developer_key()
    async with live.client(key) as client:
        no_prompt = await client.post("/v1/inference", json={"model": MODEL})
        unknown = await client.post("/v1/inference", json={"model": "nope", "prompt": "x"})
    assert no_prompt.status_code == 400 and no_prompt.json()["error"]["param"] == "prompt"
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "MODEL_NOT_FOUND"
