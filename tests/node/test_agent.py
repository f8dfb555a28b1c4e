"""The node agent: reconnecting with backoff, draining on SIGTERM, giving up on a bad token."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from swarmgate.node import agent as agent_module
from swarmgate.node.agent import FatalConnectionError, NodeAgent, backoff_delay
from swarmgate.node.backends.sim import SimBackend, SimConfig, sim_answer
from swarmgate.protocol import DeviceFacts
from tests.conftest import (
    ADMIN_TOKEN,
    MODEL,
    LiveGateway,
    fast_settings,
    free_port,
    run_cli,
    start_gateway,
    stop_gateway,
    swarmgate_cmd,
    wait_http,
)


def sim_agent(live: LiveGateway, token: str, **config: Any) -> NodeAgent:
    return NodeAgent(
        gateway_url=live.ws_url,
        token=token,
        backend=SimBackend(SimConfig(**config)),
        models=[MODEL],
        facts=DeviceFacts(os="sim", cpu="sim", ram_mb=1024),
        reconnect_min_s=0.05,
        reconnect_max_s=0.5,
        drain_timeout_s=2.0,
    )


async def chat(live: LiveGateway, key: str, content: str) -> httpx.Response:
    async with live.client(key) as client:
        return await client.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": content}]},
        )


# -- (a) reconnecting after the gateway restarts ----------------------------------------------
async def test_node_reconnects_after_the_gateway_restarts(tmp_path: Path) -> None:
    settings = fast_settings(tmp_path)
    first = await start_gateway(settings)
    second: LiveGateway | None = None
    stop = asyncio.Event()
    task: asyncio.Task[None] | None = None
    try:
        device_id, token = await first.device_token()
        _, key = await first.developer_key()
        node = sim_agent(first, token, length=5)
        task = asyncio.create_task(node.run(stop))
        await first.wait_for_device(device_id)
        assert (await chat(first, key, "before")).status_code == 200

        await stop_gateway(first)
        assert not task.done(), "the agent must outlive its gateway"
        deadline = time.monotonic() + 5
        while node.connected.is_set():
            assert time.monotonic() < deadline, "the agent never noticed the gateway left"
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # a few failed reconnects against a closed port
        assert not task.done()

        # Same port, same data directory: the device token and API key are still valid.
        second = await start_gateway(fast_settings(tmp_path, port=settings.port))
        await second.wait_for_device(device_id)
        reply = await chat(second, key, "after")
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == "".join(
            sim_answer(MODEL, "after", None, 5)
        )
        assert reply.json()["swarmgate"]["device_id"] == device_id
        assert node.stats.sessions == 2
        assert node.stats.jobs_done == 2
    finally:
        stop.set()
        if task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 5)
        if second is not None:
            await stop_gateway(second)
        else:
            await stop_gateway(first)


# -- (b) the backoff itself ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("attempt", "low", "high", "cap"),
    [
        (0, 0.5, 30.0, 0.5),
        (1, 0.5, 30.0, 1.0),
        (2, 0.5, 30.0, 2.0),
        (3, 0.5, 30.0, 4.0),
        (5, 0.5, 30.0, 16.0),
        (6, 0.5, 30.0, 30.0),  # 32 would pass the ceiling
        (20, 0.5, 30.0, 30.0),
        (200, 0.5, 30.0, 30.0),  # no overflow for a long outage
        (4, 0.05, 0.5, 0.5),
        (3, 1.0, 1.0, 1.0),  # low == high: no room to jitter
    ],
)
def test_backoff_delay_stays_within_bounds(
    attempt: int, low: float, high: float, cap: float
) -> None:
    rng = random.Random(1234)
    delays = [backoff_delay(attempt, low, high, rng) for _ in range(500)]
    assert all(low <= d <= cap for d in delays), (min(delays), max(delays))
    if cap > low:
        # Jittered: spread over the window, not one fixed value.
        assert len(set(delays)) > 400
        assert min(delays) < low + (cap - low) * 0.1
        assert max(delays) > cap - (cap - low) * 0.1
    else:
        assert set(delays) == {low}


def test_backoff_delay_grows_with_attempts_and_is_seeded() -> None:
    low, high = 0.5, 30.0
    means = []
    for attempt in range(10):
        rng = random.Random(attempt)
        samples = [backoff_delay(attempt, low, high, rng) for _ in range(2000)]
        means.append(sum(samples) / len(samples))
    # Grows until the cap (0.5 * 2**6 = 32 > 30)...
    assert all(b > a for a, b in itertools.pairwise(means[:7])), means
    # ...then stays there: the mean sits near the middle of [low, high].
    assert all(abs(m - (low + high) / 2) < 1.0 for m in means[6:]), means
    one = [backoff_delay(3, low, high, random.Random(42)) for _ in range(5)]
    two = [backoff_delay(3, low, high, random.Random(42)) for _ in range(5)]
    assert one == two


# -- (c) SIGTERM drains, end to end with real processes -----------------------------------------
def _cli_json(*args: str, env: dict[str, str]) -> dict[str, Any]:
    done = run_cli("admin", "--json", *args, env=env)
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    payload = orjson.loads(done.stdout)
    assert isinstance(payload, dict)
    return payload


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)


async def _wait_device_state(admin: httpx.AsyncClient, device_id: str, state: str | None) -> None:
    deadline = time.monotonic() + 10
    while True:
        devices = (await admin.get("/admin/devices")).json()["data"]
        connection = next(d["connection"] for d in devices if d["id"] == device_id)
        current = None if connection is None else connection["state"]
        if current == state:
            return
        assert time.monotonic() < deadline, f"device stayed {current!r}, wanted {state!r}"
        await asyncio.sleep(0.02)


async def test_sigterm_drains_the_running_request_then_exits_0(tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {
        "SWARMGATE_DATA_DIR": str(tmp_path / "data"),
        "SWARMGATE_PORT": str(port),
        "SWARMGATE_ADMIN_TOKEN": ADMIN_TOKEN,
        "SWARMGATE_QUEUE_WAIT_S": "0.2",  # so the refused request is refused quickly
    }
    full_env = {**os.environ, **env}
    processes: list[subprocess.Popen[bytes]] = []
    logs = {name: tmp_path / f"{name}.log" for name in ("serve", "node")}
    try:
        # The first admin command creates the database; the rest run beside the gateway's
        # start. One account can be both a developer (API keys) and a provider (devices).
        account = _cli_json(
            "accounts", "create", "--name", "both", "--credits", "5", "--provider", env=env
        )
        with logs["serve"].open("wb") as out:
            processes.append(
                subprocess.Popen(  # noqa: S603 - our own CLI
                    swarmgate_cmd("serve"), env=full_env, stdout=out, stderr=subprocess.STDOUT
                )
            )
        with ThreadPoolExecutor(2) as pool:
            key_job = pool.submit(_cli_json, "keys", "create", "--account", account["id"], env=env)
            device = _cli_json("devices", "create", "--account", account["id"], env=env)
            key = key_job.result()["key"]

        # The node may start before the gateway listens: it retries until it is up.
        with logs["node"].open("wb") as out:
            node = subprocess.Popen(  # noqa: S603 - our own CLI
                swarmgate_cmd(
                    "node",
                    "--gateway",
                    f"ws://127.0.0.1:{port}/v1/nodes/connect",
                    "--token",
                    device["token"],
                    "--backend",
                    "sim",
                    "--sim-tokens-per-s",
                    "10",
                    "--sim-length",
                    "20",
                ),
                env={
                    **full_env,
                    "SWARMGATE_NODE_RECONNECT_MIN_S": "0.1",
                    "SWARMGATE_NODE_RECONNECT_MAX_S": "0.2",
                },
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        processes.append(node)
        await asyncio.to_thread(wait_http, f"{base}/healthz")

        headers = {"Authorization": f"Bearer {key}"}
        async with (
            httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as client,
            httpx.AsyncClient(
                base_url=base, timeout=30, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
            ) as admin,
        ):
            await _wait_device_state(admin, device["id"], "ready")
            body = {
                "model": MODEL,
                "stream": True,
                "messages": [{"role": "user", "content": "drain me"}],
            }
            chunks: list[dict[str, Any]] = []
            async with client.stream("POST", "/v1/chat/completions", json=body) as stream:
                assert stream.status_code == 200
                lines = stream.aiter_lines()
                async for line in lines:
                    if line.startswith("data: {"):
                        chunks.append(orjson.loads(line[6:]))
                        if chunks[-1]["choices"] and chunks[-1]["choices"][0]["delta"].get(
                            "content"
                        ):
                            break
                node.send_signal(signal.SIGTERM)

                # While it drains, the device is still connected but paused: a new request
                # finds the model loaded and every device busy, hence DEVICES_BUSY.
                await _wait_device_state(admin, device["id"], "paused")
                refused = await client.post(
                    "/v1/chat/completions",
                    json={"model": MODEL, "messages": [{"role": "user", "content": "new"}]},
                )
                assert refused.status_code == 503, refused.text
                assert refused.json()["error"]["code"] == "DEVICES_BUSY"
                assert "retry-after" in refused.headers

                async for line in lines:
                    if line.startswith("data: {"):
                        chunks.append(orjson.loads(line[6:]))

            assert all("error" not in c for c in chunks), chunks[-1]
            text = "".join(
                c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]
            )
            assert text == "".join(sim_answer(MODEL, "drain me", None, 20))
            finishes = [
                c["choices"][0]["finish_reason"]
                for c in chunks
                if c["choices"] and c["choices"][0]["finish_reason"]
            ]
            assert finishes == ["stop"]

            returncode = await asyncio.to_thread(node.wait, 5)
            assert returncode == 0, logs["node"].read_text()

            # Once the node is gone no device has the model: that is model_warming.
            await _wait_device_state(admin, device["id"], None)
            gone = await client.post(
                "/v1/chat/completions",
                json={"model": MODEL, "messages": [{"role": "user", "content": "later"}]},
            )
            assert gone.status_code == 503
            assert gone.json()["error"]["code"] == "model_warming"
    finally:
        for process in reversed(processes):
            _stop(process)


# -- (d) a token the gateway refuses ends the node ------------------------------------------------
async def test_node_with_a_wrong_token_exits_1_with_a_clear_message(live: LiveGateway) -> None:
    process = await asyncio.create_subprocess_exec(
        *swarmgate_cmd(
            "node",
            "--gateway",
            live.ws_url,
            "--token",
            "sg_dev_not-a-real-token",
            "--backend",
            "sim",
        ),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), 20)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 1, stderr.decode()
    message = stderr.decode()
    assert "swarmgate node: gateway refused this node (4001)" in message
    assert "device token" in message
    assert "Traceback" not in message


async def test_agent_raises_fatal_error_for_a_wrong_token(live: LiveGateway) -> None:
    node = sim_agent(live, "sg_dev_wrong")
    with pytest.raises(FatalConnectionError, match=r"\(4001\)"):
        await asyncio.wait_for(node.run(asyncio.Event()), 10)
    assert node.stats.sessions == 0


async def test_agent_raises_fatal_error_for_an_unsupported_protocol(
    live: LiveGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, token = await live.device_token()
    monkeypatch.setattr(agent_module, "PROTOCOL_VERSION", 99)
    node = sim_agent(live, token)
    with pytest.raises(FatalConnectionError, match=r"\(4002\).*protocol 99"):
        await asyncio.wait_for(node.run(asyncio.Event()), 10)


def test_node_without_a_token_exits_2() -> None:
    done = run_cli("node", "--backend", "sim", env={"SWARMGATE_NODE_TOKEN": ""})
    assert done.returncode == 2
    assert "a device token is needed" in done.stderr
