"""The device guard inside the node agent: pausing and resuming against a live gateway."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson

from swarmgate.node.agent import NodeAgent
from swarmgate.node.backends.sim import SimBackend, SimConfig, sim_answer
from swarmgate.node.guard import DeviceGuard, FixedSensors, GuardPolicy, PauseDecision, Readings
from swarmgate.protocol import DeviceFacts, JobFrame
from swarmgate.routing.profile import MEASURED_AFTER
from swarmgate.routing.states import ConnectionState
from tests.conftest import (
    ADMIN_TOKEN,
    MODEL,
    LiveGateway,
    fast_settings,
    start_gateway,
    stop_gateway,
)

FINE = Readings(battery_percent=80.0, charging=False, temperature_c=31.5, cpu_percent=7.0)


def guarded_agent(
    live: LiveGateway | None, token: str, sensors: FixedSensors, **sim: Any
) -> tuple[NodeAgent, DeviceGuard]:
    guard = DeviceGuard(sensors, GuardPolicy(), interval_s=0.05)
    agent = NodeAgent(
        gateway_url=live.ws_url if live else "ws://127.0.0.1:9/v1/nodes/connect",
        token=token,
        backend=SimBackend(SimConfig(**sim)),
        models=[MODEL],
        facts=DeviceFacts(os="sim", cpu="sim", ram_mb=1024),
        reconnect_min_s=0.05,
        reconnect_max_s=0.5,
        drain_timeout_s=2.0,
        guard=guard,
    )
    return agent, guard


def start(live: LiveGateway, agent: NodeAgent) -> None:
    stop = asyncio.Event()
    live.agents.append((agent, stop, asyncio.create_task(agent.run(stop))))


async def eventually(check: Callable[[], bool], what: str, timeout: float = 5.0) -> float:
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, f"never: {what}"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def chat(live: LiveGateway, key: str, content: str) -> httpx.Response:
    async with live.client(key) as client:
        return await client.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": content}]},
        )


async def stream_chat(live: LiveGateway, key: str, content: str) -> tuple[str, list[str]]:
    """A streamed request: (the text, the finish reasons)."""
    body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": content}]}
    text, finishes = [], []
    async with (
        live.client(key) as client,
        client.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = orjson.loads(line[6:])
            assert "error" not in chunk, chunk
            for choice in chunk["choices"]:
                text.append(choice["delta"].get("content") or "")
                if choice["finish_reason"]:
                    finishes.append(choice["finish_reason"])
    return "".join(text), finishes


# -- the agent on its own -------------------------------------------------------------------
class RecordingSocket:
    """Stands in for the gateway connection: keeps what the agent sends."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    async def send(self, text: str) -> None:
        self.sent.append(orjson.loads(text))


def job(job_id: str) -> JobFrame:
    return JobFrame.model_validate(
        {
            "job_id": job_id,
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "params": {"max_tokens": 16, "temperature": 0.0, "top_p": 1.0},
            "stream": False,
        }
    )


async def test_a_paused_agent_refuses_jobs_with_device_paused() -> None:
    sensors = FixedSensors(FINE)
    agent, guard = guarded_agent(None, "unused", sensors, length=3)
    ws = RecordingSocket()
    try:
        await guard.check()
        beat = agent._heartbeat()
        assert beat == {
            "type": "heartbeat",
            "active_jobs": 0,
            "paused": False,
            "pause_reason": None,
            "cpu_percent": 7.0,
            "temperature_c": 31.5,
            "battery_percent": 80.0,
        }

        sensors.update(battery_percent=9.5)
        await guard.check()
        beat = agent._heartbeat()
        assert beat["paused"] is True
        assert beat["pause_reason"] == "battery 9.5% and not charging"
        assert beat["battery_percent"] == 9.5

        agent._start_job(ws, job("j1"))  # type: ignore[arg-type]
        await eventually(lambda: bool(ws.sent), "the refusal")
        assert ws.sent == [
            {
                "type": "error",
                "job_id": "j1",
                "code": "DEVICE_PAUSED",
                "message": "device paused: battery 9.5% and not charging",
            }
        ]
        assert not agent._jobs

        # Draining comes first, whatever the guard says.
        agent._draining = True
        assert agent._heartbeat()["pause_reason"] == "draining"
        agent._start_job(ws, job("j2"))  # type: ignore[arg-type]
        await eventually(lambda: len(ws.sent) == 2, "the second refusal")
        assert ws.sent[1]["code"] == "NODE_BUSY"
        assert ws.sent[1]["message"] == "node is draining"
    finally:
        await agent.backend.close()


async def test_an_agent_without_a_guard_sends_plain_heartbeats() -> None:
    agent = NodeAgent(
        gateway_url="ws://127.0.0.1:9/v1/nodes/connect",
        token="unused",
        backend=SimBackend(SimConfig()),
        models=[MODEL],
        facts=DeviceFacts(os="sim", cpu="sim", ram_mb=1024),
    )
    try:
        assert agent._heartbeat() == {
            "type": "heartbeat",
            "active_jobs": 0,
            "paused": False,
            "pause_reason": None,
        }
    finally:
        await agent.backend.close()


# -- against a live gateway -------------------------------------------------------------------
async def test_low_battery_pauses_the_node_and_it_resumes_by_itself(tmp_path: Path) -> None:
    # Heartbeats every 30 s: a pause seen within a second was sent because it happened.
    live = await start_gateway(
        fast_settings(tmp_path, heartbeat_interval_s=30.0, heartbeat_timeout_s=120.0)
    )
    try:
        device_id, token = await live.device_token()
        _, key = await live.developer_key()
        sensors = FixedSensors(FINE)
        agent, guard = guarded_agent(live, token, sensors, tokens_per_s=10, length=20)
        start(live, agent)
        await live.wait_for_device(device_id)
        device = live.gateway.registry.get(device_id)
        assert device is not None
        await eventually(lambda: device.state is ConnectionState.READY, "ready")

        # A job is running when the battery drops.
        running = asyncio.create_task(stream_chat(live, key, "a long answer"))
        await eventually(lambda: bool(agent._jobs), "the job to start")
        sensors.update(battery_percent=10.0)
        waited = await eventually(lambda: device.state is ConnectionState.PAUSED, "paused")
        assert waited < 1.0, "the pause waited for the regular heartbeat"
        assert device.pause_reason == "battery 10% and not charging"
        assert guard.paused

        async with live.client(ADMIN_TOKEN) as admin:
            listed = (await admin.get("/admin/devices")).json()["data"]
        connection = next(d["connection"] for d in listed if d["id"] == device_id)
        assert connection["state"] == "paused"
        assert connection["pause_reason"] == "battery 10% and not charging"

        # Nothing new is routed to it...
        refused = await chat(live, key, "while paused")
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "DEVICES_BUSY"

        # ...while the job it already had finishes.
        assert not running.done(), "the running job should outlast the refusal"
        text, finishes = await running
        assert text == "".join(sim_answer(MODEL, "a long answer", None, 20))
        assert finishes == ["stop"]
        assert device.state is ConnectionState.PAUSED
        assert len(device.recent) == 1, "the paused device was given another job"
        assert agent.stats.jobs_done == 1

        # Charged again: it resumes without anyone asking, and serves.
        sensors.update(battery_percent=80.0)
        waited = await eventually(lambda: device.state is ConnectionState.READY, "resumed")
        assert waited < 1.0
        assert device.pause_reason is None
        text, finishes = await stream_chat(live, key, "after")
        assert text == "".join(sim_answer(MODEL, "after", None, 20))
        assert finishes == ["stop"]
        assert agent.stats.jobs_done == 2
    finally:
        await stop_gateway(live)


async def test_a_job_that_crosses_the_pause_fails_over(live: LiveGateway) -> None:
    """The gateway routes a job just as the device pauses: the device refuses it with
    DEVICE_PAUSED and the gateway retries it elsewhere."""
    _, key = await live.developer_key()
    paused_id, paused_token = await live.device_token()
    sensors = FixedSensors(FINE)
    agent, guard = guarded_agent(live, paused_token, sensors, length=4)
    start(live, agent)
    await live.wait_for_device(paused_id)
    other = await live.add_sim_device(length=4)
    other_id = other.stats.device_id
    assert other_id is not None
    paused = live.gateway.registry.get(paused_id)
    spare = live.gateway.registry.get(other_id)
    assert paused is not None and spare is not None
    await eventually(lambda: paused.state is ConnectionState.READY, "ready")
    # So the gateway tries the paused device first: both measured, the spare slow.
    for device, ttft in ((paused, 1.0), (spare, 10_000.0)):
        for model in device.models:
            stats = device.profile.model_stats(model)
            stats.ttft_ms, stats.samples = ttft, MEASURED_AFTER
            live.gateway.registry.measured(device, model)

    # The device has decided to pause; its heartbeat has not reached the gateway yet.
    guard.interval_s = 3600
    await asyncio.sleep(0.2)  # the guard's loop is now in its long sleep
    guard.decision = PauseDecision(True, "temperature 51.2 °C", frozenset({"temperature"}))
    reply = await chat(live, key, "cross")
    assert reply.status_code == 200, reply.text
    assert reply.json()["swarmgate"]["device_id"] == other_id
    assert agent.stats.jobs_done == 0
