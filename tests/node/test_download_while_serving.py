"""A node connects before its model is downloaded: warming while it downloads, served after."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

from swarmgate.catalog import Artifact, Catalog, CatalogModel, Pricing
from swarmgate.node.agent import NodeAgent
from swarmgate.node.backends.sim import SimBackend, SimConfig
from swarmgate.node.models_cli import download_while_serving
from swarmgate.protocol import DeviceFacts
from tests.conftest import MODEL, LiveGateway
from tests.node.test_model_store import FILENAME, FileServer

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "ready yet?"}]}


async def test_warming_while_downloading_then_served(live: LiveGateway, tmp_path: Path) -> None:
    payload = os.urandom(2 * 1024 * 1024)
    files = FileServer(payload, body_delay_s=0.5)  # slow enough to be seen warming
    files.server = await asyncio.start_server(files.handle, "127.0.0.1", 0)
    catalog = Catalog(
        [
            CatalogModel(
                id=MODEL,
                description="test",
                context_length=2048,
                tier="p2p",
                pricing=Pricing(input_per_1m_micros=1, output_per_1m_micros=1),
                artifact=Artifact(
                    filename=FILENAME,
                    url=files.url(),
                    sha256=hashlib.sha256(payload).hexdigest(),
                    size_bytes=len(payload),
                ),
            )
        ]
    )
    device_id, token = await live.device_token()
    _, key = await live.developer_key()
    agent = NodeAgent(
        gateway_url=live.ws_url,
        token=token,
        backend=SimBackend(SimConfig(length=3)),
        models=[],
        facts=DeviceFacts(os="t", cpu="t", ram_mb=1),
    )
    stop = asyncio.Event()
    running = asyncio.create_task(agent.run(stop))
    try:
        await live.wait_for_device(device_id)
        paths: dict[str, str] = {}
        download = asyncio.create_task(
            download_while_serving(agent, paths, [MODEL], tmp_path / "cache", catalog=catalog)
        )
        async with live.client(key) as client:
            for _ in range(100):
                if live.gateway.registry.warming_count(MODEL):
                    break
                await asyncio.sleep(0.05)
            warming = await client.post("/v1/chat/completions", json=CHAT)
            assert warming.status_code == 503
            assert warming.json()["error"]["code"] == "model_warming"
            assert "being downloaded" in warming.json()["error"]["message"]

            await asyncio.wait_for(download, 20)
            assert Path(paths[MODEL]).read_bytes() == payload
            served = await client.post("/v1/chat/completions", json=CHAT)
        assert served.status_code == 200, served.text
        assert served.json()["swarmgate"]["device_id"] == device_id
        assert agent.warming == {}
        assert live.gateway.registry.warming_count(MODEL) == 0
    finally:
        stop.set()
        await asyncio.wait_for(running, 10)
        files.server.close()
        await files.server.wait_closed()
