"""Model warming: a device downloading a model makes it 'warming'; announcing it makes it served."""

from __future__ import annotations

import asyncio

import orjson
from websockets.asyncio.client import connect

from swarmgate.catalog import Catalog
from swarmgate.protocol import PROTOCOL_VERSION
from tests.conftest import MODEL, LiveGateway

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "warm?"}]}
SHA = Catalog.load().get(MODEL).artifact.sha256  # type: ignore[union-attr]


def frame(**payload: object) -> str:
    return orjson.dumps(payload).decode()


HELLO = frame(
    type="hello",
    protocol=PROTOCOL_VERSION,
    node_version="t",
    device={"os": "t", "cpu": "t", "ram_mb": 1},
    models=[],
)


async def test_warming_then_announced_model_is_served(live: LiveGateway) -> None:
    _, token = await live.device_token()
    _, key = await live.developer_key()
    async with (
        connect(
            live.ws_url, additional_headers={"Authorization": f"Bearer {token}"}, compression=None
        ) as ws,
        live.client(key) as client,
    ):
        await ws.send(HELLO)
        assert orjson.loads(await ws.recv())["type"] == "welcome"

        nobody = await client.post("/v1/chat/completions", json=CHAT)
        assert nobody.status_code == 503
        assert nobody.json()["error"]["code"] == "model_warming"
        assert nobody.headers["retry-after"] == str(live.settings.warming_retry_after_s)

        await ws.send(
            frame(type="heartbeat", active_jobs=0, warming=[{"id": MODEL, "progress": 0.4}])
        )
        await asyncio.sleep(0.1)
        downloading = await client.post("/v1/chat/completions", json=CHAT)
        assert downloading.status_code == 503
        assert downloading.json()["error"]["code"] == "model_warming"
        assert "being downloaded by 1 device" in downloading.json()["error"]["message"]
        assert downloading.headers["retry-after"] == "30"
        models = {m["id"]: m for m in (await client.get("/v1/models")).json()["data"]}
        assert models[MODEL]["available"] is False

        await ws.send(frame(type="models", models=[{"id": MODEL, "sha256": SHA}]))
        await ws.send(frame(type="heartbeat", active_jobs=0, warming=[]))
        await asyncio.sleep(0.1)
        pending = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
        job = orjson.loads(await asyncio.wait_for(ws.recv(), 5))
        assert job["type"] == "job" and job["model"] == MODEL
        await ws.send(
            frame(
                type="done",
                job_id=job["job_id"],
                finish_reason="stop",
                usage={"prompt_tokens": 3, "completion_tokens": 1},
                text="warm",
            )
        )
        served = await pending
        assert served.status_code == 200
        assert served.json()["choices"][0]["message"]["content"] == "warm"
        assert live.gateway.registry.warming_count(MODEL) == 0


async def test_announcing_a_wrong_artifact_is_not_routed(live: LiveGateway) -> None:
    _, token = await live.device_token()
    _, key = await live.developer_key()
    async with (
        connect(
            live.ws_url, additional_headers={"Authorization": f"Bearer {token}"}, compression=None
        ) as ws,
        live.client(key) as client,
    ):
        await ws.send(HELLO)
        await ws.recv()
        await ws.send(frame(type="models", models=[{"id": MODEL, "sha256": "0" * 64}]))
        await asyncio.sleep(0.1)
        response = await client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 503
    assert not live.gateway.registry.has_model(MODEL)


async def test_disconnect_clears_warming(live: LiveGateway) -> None:
    _, token = await live.device_token()
    async with connect(
        live.ws_url, additional_headers={"Authorization": f"Bearer {token}"}, compression=None
    ) as ws:
        await ws.send(HELLO)
        await ws.recv()
        await ws.send(frame(type="heartbeat", active_jobs=0, warming=[{"id": MODEL}]))
        await asyncio.sleep(0.1)
        assert live.gateway.registry.warming_count(MODEL) == 1
    for _ in range(100):
        if live.gateway.registry.warming_count(MODEL) == 0:
            break
        await asyncio.sleep(0.02)
    assert live.gateway.registry.warming_count(MODEL) == 0
