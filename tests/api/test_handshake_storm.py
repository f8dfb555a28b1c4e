"""A storm of device connections takes turns at the database instead of draining the
connection pool that requests need (device_handshake_concurrency)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import LiveGateway, fast_settings, start_gateway, stop_gateway

DEVICES = 60


@pytest.fixture
async def narrow(tmp_path: Path) -> AsyncIterator[LiveGateway]:
    live = await start_gateway(fast_settings(tmp_path, device_handshake_concurrency=2))
    try:
        yield live
    finally:
        await stop_gateway(live)


async def test_many_devices_connecting_at_once_leave_the_pool_to_requests(
    narrow: LiveGateway,
) -> None:
    live = narrow
    tokens = [(await live.device_token())[1] for _ in range(DEVICES)]
    pool = live.gateway.engine.sync_engine.pool
    most = 0
    stop = asyncio.Event()

    async def watch() -> None:
        nonlocal most
        while not stop.is_set():
            most = max(most, pool.checkedout())  # type: ignore[attr-defined]
            await asyncio.sleep(0)

    watcher = asyncio.create_task(watch())
    started = time.monotonic()
    await asyncio.gather(*(live.add_sim_device(token=t, wait=False) for t in tokens))
    slow_ready = 0.0
    async with live.client() as client:
        while len(live.gateway.registry.devices()) < DEVICES:
            assert time.monotonic() - started < 60, "the devices did not all connect"
            asked = time.monotonic()
            assert (await client.get("/readyz")).status_code == 200
            slow_ready = max(slow_ready, time.monotonic() - asked)
            await asyncio.sleep(0.01)
    stop.set()
    await watcher
    # Two handshakes at a time, the readiness check, one background writer (job log, trust).
    assert most <= 4, most
    assert slow_ready < 5
