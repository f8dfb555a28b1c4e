"""Scale-out fixtures: a fresh PostgreSQL database and a fresh Redis key prefix per test,
on the real local servers (``scripts/services.sh`` starts them; ``.ci/run`` calls it).

``SWARMGATE_TEST_POSTGRES_URL`` and ``SWARMGATE_TEST_REDIS_URL`` point elsewhere. Where a
server is missing the tests are skipped with the reason, except under ``CI=true``, where
a missing server is a failure: CI must run them.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from swarmgate.routing.registry import DeviceConnection
from tests.conftest import LiveGateway, fast_settings, start_gateway, stop_gateway

POSTGRES_URL = os.environ.get(
    "SWARMGATE_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("SWARMGATE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _unavailable(what: str, exc: BaseException) -> None:
    message = f"no {what}: {type(exc).__name__}: {exc}"[:300]
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message} (CI must run the scale-out tests: scripts/services.sh)")
    pytest.skip(message)


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """A new, empty PostgreSQL database for this test (dropped afterwards); its URL."""
    import asyncpg

    name = f"sg_test_{secrets.token_hex(6)}"
    plain = POSTGRES_URL.replace("postgresql+asyncpg://", "postgresql://")
    try:
        admin = await asyncpg.connect(plain, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        _unavailable(f"PostgreSQL at {POSTGRES_URL}", exc)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    """A key prefix of this test's own; every key under it is deleted afterwards."""
    client = Redis.from_url(REDIS_URL)
    try:
        await client.ping()
    except OSError as exc:
        await client.aclose()
        _unavailable(f"Redis at {REDIS_URL}", exc)
    except Exception as exc:
        await client.aclose()
        _unavailable(f"Redis at {REDIS_URL}", exc)
    prefix = f"sgt{secrets.token_hex(4)}:"
    try:
        yield prefix
    finally:
        async for key in client.scan_iter(match=f"{prefix}*", count=500):
            await client.delete(key)
        await client.aclose()


@pytest.fixture
async def redis_client() -> AsyncIterator[Redis]:
    client = Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


def cluster_settings(
    data_dir: Path, database_url: str, prefix: str, gateway_id: str, **overrides: Any
) -> Any:
    values: dict[str, Any] = {
        "database_url": database_url,
        "redis_url": REDIS_URL,
        "redis_prefix": prefix,
        "gateway_id": gateway_id,
        "cluster_gateway_ttl_s": 1.0,
        "cluster_liveness_interval_s": 0.2,
        "cluster_sync_interval_s": 0.6,
        "cluster_device_ttl_s": 10.0,
    }
    values.update(overrides)
    return fast_settings(data_dir, **values)


@dataclass
class Pair:
    a: LiveGateway
    b: LiveGateway


@pytest.fixture
async def pair(tmp_path: Path, pg_url: str, redis_prefix: str) -> AsyncIterator[Pair]:
    """Two gateways on one PostgreSQL database and one Redis prefix."""
    a = await start_gateway(cluster_settings(tmp_path / "a", pg_url, redis_prefix, "gw-a"))
    b = await start_gateway(cluster_settings(tmp_path / "b", pg_url, redis_prefix, "gw-b"))
    try:
        yield Pair(a, b)
    finally:
        await stop_gateway(b)
        await stop_gateway(a)


async def wait_remote(live: LiveGateway, device_id: str, timeout: float = 10.0) -> DeviceConnection:
    """Waits until ``live`` lists ``device_id`` as a device of another gateway."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        device = live.gateway.registry.get(device_id)
        if device is not None and not device.local:
            return device
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{device_id} never reached {live.settings.gateway_id}")
        await asyncio.sleep(0.02)
