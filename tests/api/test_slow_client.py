"""A streaming client that stops reading cannot hold a device: it is dropped, its job
cancelled on the device and not charged, and the device serves others again."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from sqlalchemy import func, select

from swarmgate.store.tables import charges
from tests.conftest import MODEL, LiveGateway, fast_settings, start_gateway, stop_gateway

LONG = 150_000  # tokens: megabytes of events, far more than the sockets' buffers hold


def roomy_catalog(path: Path) -> Path:
    """The catalog with a context long enough for a very long answer."""
    catalog = orjson.loads((Path(__file__).parents[2] / "src/swarmgate/catalog.json").read_bytes())
    for model in catalog["models"]:
        if model["id"] == MODEL:
            model["context_length"] = 2 * LONG
    target = path / "catalog.json"
    target.write_bytes(orjson.dumps(catalog))
    return target


@pytest.fixture
async def patient(tmp_path: Path) -> AsyncIterator[LiveGateway]:
    settings = fast_settings(
        tmp_path,
        catalog_path=roomy_catalog(tmp_path),
        max_tokens_limit=2 * LONG,
        client_stall_timeout_s=1.5,
        first_token_timeout_s=10.0,
        token_stall_timeout_s=30.0,
    )
    live = await start_gateway(settings)
    try:
        yield live
    finally:
        await stop_gateway(live)


async def test_a_client_that_never_reads_is_dropped_and_frees_the_device(
    patient: LiveGateway, caplog: pytest.LogCaptureFixture
) -> None:
    live = patient
    # As fast as a big GPU: the sockets fill within a second or two, long before the end.
    agent = await live.add_sim_device(slots=1, length=LONG, tokens_per_s=20_000)
    device = live.gateway.registry.get(agent.stats.device_id or "")
    assert device is not None
    _account, key = await live.developer_key()
    body = orjson.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Tell me everything"}],
            "max_tokens": LONG,
            "stream": True,
        }
    )
    # A client with a tiny receive window that reads nothing after sending its request.
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.setblocking(False)
    await asyncio.get_running_loop().sock_connect(raw, ("127.0.0.1", live.settings.port))
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
        + f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n".encode()
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await asyncio.get_running_loop().sock_sendall(raw, request)
    try:
        with caplog.at_level(logging.WARNING, logger="swarmgate.api"):
            deadline = time.monotonic() + 10
            while device.free_slots:  # the job starts
                assert time.monotonic() < deadline, "the job never started"
                await asyncio.sleep(0.01)
            started = time.monotonic()
            await asyncio.sleep(0.5)
            assert device.free_slots == 0  # still held while within the allowance
            while not device.free_slots:
                assert time.monotonic() - started < 15, "the stalled client kept the device"
                await asyncio.sleep(0.05)
            held_for = time.monotonic() - started
        assert held_for >= 1.4
        assert "its stream was dropped" in caplog.text
        # Nothing was charged for the abandoned answer, and the device serves again.
        async with live.client(key) as client:
            answer = await client.post(
                "/v1/chat/completions",
                json={
                    "model": MODEL,
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 8,
                },
            )
        assert answer.status_code == 200
        await live.gateway.billing.writer.posted()
        async with live.gateway.engine.connect() as conn:
            charged = await conn.scalar(select(func.count()).select_from(charges))
        assert charged == 1  # the second request only
    finally:
        raw.close()
