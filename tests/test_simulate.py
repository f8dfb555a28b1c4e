"""``swarmgate simulate``: many sim devices in one process, registered through the admin API."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess

import pytest

from swarmgate.simulate import parse_mix, ws_url
from tests.conftest import ADMIN_TOKEN, MODEL, LiveGateway, swarmgate_cmd


@pytest.mark.parametrize(
    ("mix", "devices", "expected"),
    [
        ("", 3, ["healthy"] * 3),
        ("healthy=2,hanging=1", 9, ["healthy", "healthy", "hanging"]),
        ("slow=1, flaky=2", 0, ["slow", "flaky", "flaky"]),
        ("dying", 0, ["dying"]),
    ],
)
def test_parse_mix(mix: str, devices: int, expected: list[str]) -> None:
    assert parse_mix(mix, devices) == expected


def test_parse_mix_rejects_unknown_profiles() -> None:
    with pytest.raises(ValueError, match="unknown profile"):
        parse_mix("sneaky=1", 0)


def test_ws_url() -> None:
    assert ws_url("http://h:1/") == "ws://h:1/v1/nodes/connect"
    assert ws_url("https://h") == "wss://h/v1/nodes/connect"


async def test_simulated_fleet_serves_requests(live: LiveGateway) -> None:
    process = await asyncio.create_subprocess_exec(
        *swarmgate_cmd(
            "simulate",
            "--gateway",
            live.base_url,
            "--admin-token",
            ADMIN_TOKEN,
            "--devices",
            "4",
            "--mix",
            "healthy=3,hanging=1",
            "--sim-length",
            "6",
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        for _ in range(200):
            if len(live.gateway.registry.devices()) == 4:
                break
            await asyncio.sleep(0.05)
        assert len(live.gateway.registry.devices()) == 4
        _, key = await live.developer_key()
        async with live.client(key) as client:
            replies = await asyncio.gather(
                *(
                    client.post(
                        "/v1/chat/completions",
                        json={"model": MODEL, "messages": [{"role": "user", "content": f"q{i}"}]},
                    )
                    for i in range(8)
                )
            )
        assert [r.status_code for r in replies] == [200] * 8
        assert all(r.json()["usage"]["completion_tokens"] == 6 for r in replies)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 15)
        except TimeoutError:
            process.kill()
            await process.wait()
        assert process.stderr is not None
        errors = (await process.stderr.read()).decode()
    assert process.returncode == 0, errors
    assert "Traceback" not in errors
