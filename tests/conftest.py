"""Shared fixtures: a real gateway on a free port, accounts and keys, simulated devices."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn

from swarmgate.accounts import service
from swarmgate.api.app import create_asgi_app
from swarmgate.config import GatewaySettings
from swarmgate.gateway import Gateway
from swarmgate.node.agent import NodeAgent
from swarmgate.node.backends.sim import SimBackend, SimConfig
from swarmgate.protocol import DeviceFacts
from swarmgate.tracing import Tracing

MODEL = "smollm2-135m-instruct-q4_1"
ADMIN_TOKEN = "test-admin-token-0123456789"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fast_settings(data_dir: Path, **overrides: Any) -> GatewaySettings:
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "admin_token": ADMIN_TOKEN,
        "port": free_port(),
        "first_token_timeout_s": 1.0,
        "token_stall_timeout_s": 1.0,
        "retry_backoff_ms": 10,
        "failover_budget_s": 8.0,
        "queue_wait_s": 0.5,
        "heartbeat_interval_s": 0.5,
        "heartbeat_timeout_s": 3.0,
        "job_log_flush_ms": 10,
        "canary_interval_s": 0.0,  # tests send canaries themselves
    }
    values.update(overrides)
    return GatewaySettings(**values)


class _QuietServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class LiveGateway:
    """A gateway served by uvicorn on a real socket, inside the test's event loop."""

    settings: GatewaySettings
    gateway: Gateway
    server: uvicorn.Server
    task: asyncio.Task[None]
    agents: list[tuple[NodeAgent, asyncio.Event, asyncio.Task[None]]] = field(default_factory=list)
    sdk_clients: list[openai.AsyncOpenAI] = field(default_factory=list)

    def sdk(self, key: str) -> openai.AsyncOpenAI:
        """The official OpenAI SDK pointed at this gateway (closed when the gateway stops)."""
        client = openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key=key, max_retries=0)
        self.sdk_clients.append(client)
        return client

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.settings.port}/v1/nodes/connect"

    async def developer_key(self, name: str = "dev") -> tuple[str, str]:
        account = await service.create_account(
            self.gateway.engine, name=name, credit_micros=5_000_000
        )
        key = await service.create_api_key(self.gateway.engine, account_id=account["id"])
        return account["id"], key.secret

    async def device_token(self) -> tuple[str, str]:
        provider = await service.create_account(
            self.gateway.engine, name="provider", developer=False, provider=True
        )
        device = await service.create_device(self.gateway.engine, account_id=provider["id"])
        return device.id, device.secret

    async def add_sim_device(
        self,
        model: str = MODEL,
        slots: int = 1,
        wait: bool = True,
        token: str | None = None,
        **config: Any,
    ) -> NodeAgent:
        """A ``sim`` node on its own new device, or on the device ``token`` belongs to."""
        device_id: str | None = None
        if token is None:
            device_id, token = await self.device_token()
        agent = NodeAgent(
            gateway_url=self.ws_url,
            token=token,
            backend=SimBackend(SimConfig(**config)),
            models=[model],
            slots=slots,
            facts=DeviceFacts(os="sim", cpu="sim", ram_mb=1024),
            reconnect_min_s=0.05,
            reconnect_max_s=0.5,
            drain_timeout_s=2.0,
        )
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        self.agents.append((agent, stop, task))
        if wait:
            # The gateway lists a device before the node has read its welcome frame.
            deadline = time.monotonic() + 10
            while agent.stats.device_id is None:
                if time.monotonic() > deadline:
                    raise AssertionError(f"device {device_id} never got its welcome")
                await asyncio.sleep(0.01)
            await self.wait_for_device(device_id or agent.stats.device_id)
        return agent

    async def add_llama_device(self, n_ctx: int = 512, n_threads: int = 2) -> tuple[str, NodeAgent]:
        """A real llama.cpp node with the bundled model, on its own new device; returns
        once its model is served (loading takes a few seconds)."""
        from swarmgate.node.backends.llama_cpp import LlamaCppBackend

        device_id, token = await self.device_token()
        agent = NodeAgent(
            gateway_url=self.ws_url,
            token=token,
            backend=LlamaCppBackend(n_ctx=n_ctx, n_threads=n_threads),
            models=[MODEL],
            facts=DeviceFacts(os="linux", cpu="test", ram_mb=1024),
            reconnect_min_s=30,
        )
        stop = asyncio.Event()
        self.agents.append((agent, stop, asyncio.create_task(agent.run(stop))))
        await self.wait_for_device(device_id, timeout=120)
        deadline = time.monotonic() + 120
        while not self.gateway.registry.has_model(MODEL):
            if time.monotonic() > deadline:
                raise AssertionError("the llama.cpp device never served its model")
            await asyncio.sleep(0.1)
        return device_id, agent

    async def wait_for_device(self, device_id: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.gateway.registry.get(device_id) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"device {device_id} never connected")
            await asyncio.sleep(0.01)

    def client(self, key: str | None = None, **kwargs: Any) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        kwargs.setdefault("timeout", 30)
        return httpx.AsyncClient(base_url=self.base_url, headers=headers, **kwargs)

    async def stop_agents(self) -> None:
        for _agent, stop, _task in self.agents:
            stop.set()
        for _agent, _stop, task in self.agents:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 5)
        self.agents.clear()


async def start_gateway(settings: GatewaySettings, tracing: Tracing | None = None) -> LiveGateway:
    """``tracing``: where the gateway's spans go (None: as the settings say)."""
    gateway = Gateway(settings)
    app = create_asgi_app(settings, gateway, tracing)
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=settings.port,
        loop="asyncio",
        http="httptools",
        ws="websockets-sansio",
        ws_per_message_deflate=False,
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=2,
    )
    server = _QuietServer(config)
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 10
    while not server.started:
        if task.done():
            task.result()
        if time.monotonic() > deadline:
            raise AssertionError("gateway did not start")
        await asyncio.sleep(0.01)
    return LiveGateway(settings, gateway, server, task)


async def stop_gateway(live: LiveGateway) -> None:
    for client in live.sdk_clients:
        await client.close()
    await live.stop_agents()
    live.server.should_exit = True
    with contextlib.suppress(Exception):
        await asyncio.wait_for(live.task, 10)


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[LiveGateway]:
    gateway = await start_gateway(fast_settings(tmp_path))
    try:
        yield gateway
    finally:
        await stop_gateway(gateway)


# -- processes ---------------------------------------------------------------------------
def swarmgate_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "swarmgate.cli", *args]


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it has not stopped within 10 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 - our own CLI, fixed arguments
        swarmgate_cmd(*args),
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
        check=False,
    )


def wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{url} did not come up")
