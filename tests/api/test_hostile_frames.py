"""Garbage and hostile frames from a node close that node's connection, never the gateway.

Every case connects a raw WebSocket with a valid device token, sends frames, and checks
the close code and reason the gateway answers with; then a healthy simulated device on
the same gateway must still serve a chat completion and ``/healthz`` must still be ok.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from swarmgate.node.backends.sim import sim_answer
from swarmgate.protocol import (
    CLOSE_BAD_FRAME,
    CLOSE_FRAME_TOO_LARGE,
    CLOSE_OUT_OF_ORDER,
    CLOSE_UNAUTHORIZED,
    CLOSE_UNSUPPORTED_VERSION,
    PROTOCOL_VERSION,
)
from tests.conftest import MODEL, LiveGateway, fast_settings, start_gateway, stop_gateway

Raw = str | bytes


def hello(**overrides: Any) -> dict[str, Any]:
    frame: dict[str, Any] = {
        "type": "hello",
        "protocol": PROTOCOL_VERSION,
        "node_version": "0.0.0-test",
        "device": {"os": "hostile", "cpu": "hostile", "ram_mb": 1},
        "region": "local",
        "slots": 1,
        "models": [{"id": MODEL}],
    }
    frame.update(overrides)
    return frame


def dumps(frame: Any) -> str:
    return orjson.dumps(frame).decode()


HELLO = dumps(hello())
USAGE = {"prompt_tokens": 1, "completion_tokens": 1}


async def exchange(
    url: str, token: str | None, frames: Sequence[Raw]
) -> tuple[int | None, str, list[Raw]]:
    """Sends ``frames`` in order, then reads until the gateway closes the connection.

    Returns the close code and reason the gateway sent and every frame it sent before."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    received: list[Raw] = []
    async with connect(url, additional_headers=headers, open_timeout=5, max_size=None) as ws:
        for number, frame in enumerate(frames):
            try:
                await ws.send(frame)
            except ConnectionClosed:
                break
            if number == 0 and frame is HELLO:
                # Wait for the welcome, so later frames surely arrive after the hello. A
                # refusal (a bad token) may come instead, before or after the hello.
                try:
                    received.append(await _recv(ws))
                except ConnectionClosed:
                    break
        try:
            async with asyncio.timeout(5):
                while True:
                    received.append(await ws.recv())
        except ConnectionClosed:
            pass
        return ws.close_code, ws.close_reason or "", received


async def _recv(ws: ClientConnection) -> Raw:
    async with asyncio.timeout(5):
        return await ws.recv()


async def assert_gateway_healthy(live: LiveGateway) -> None:
    """/healthz is ok and a healthy sim device (added now) serves a chat completion."""
    await live.add_sim_device(length=6)
    _, key = await live.developer_key("after")
    async with live.client(key) as client:
        health = await client.get("/healthz")
        assert health.status_code == 200
        assert health.json() == {"status": "ok"}
        reply = await client.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "still there?"}]},
        )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["choices"][0]["message"]["content"] == "".join(
        sim_answer(MODEL, "still there?", None, 6)
    )
    assert body["choices"][0]["finish_reason"] == "stop"


async def wait_gone(live: LiveGateway, device_id: str) -> None:
    deadline = time.monotonic() + 5
    while live.gateway.registry.get(device_id) is not None:
        assert time.monotonic() < deadline, "the hostile device stayed registered"
        await asyncio.sleep(0.01)


NESTED = "[" * 100_000 + "]" * 100_000
UNICODE_KEY = "é" * 100  # 200 bytes of UTF-8 in a field name that the error message echoes

CASES: list[tuple[str, list[Raw], int]] = [
    # -- before hello -------------------------------------------------------------
    ("not-json", ["{this is not json"], CLOSE_BAD_FRAME),
    ("empty-text", [""], CLOSE_BAD_FRAME),
    ("json-array", [dumps([hello()])], CLOSE_BAD_FRAME),
    ("json-null", ["null"], CLOSE_BAD_FRAME),
    ("json-number", ["42"], CLOSE_BAD_FRAME),
    ("json-string", ['"hello"'], CLOSE_BAD_FRAME),
    ("deeply-nested", [NESTED], CLOSE_BAD_FRAME),
    ("binary-garbage", [bytes(range(256))], CLOSE_BAD_FRAME),
    ("no-type", [dumps({"protocol": 1})], CLOSE_BAD_FRAME),
    ("unknown-type", [dumps({"type": "gimme-money"})], CLOSE_BAD_FRAME),
    ("type-not-a-string", [dumps({"type": 7})], CLOSE_BAD_FRAME),
    ("wrong-protocol", [dumps(hello(protocol=PROTOCOL_VERSION + 1))], CLOSE_UNSUPPORTED_VERSION),
    ("protocol-zero", [dumps(hello(protocol=0))], CLOSE_UNSUPPORTED_VERSION),
    (
        "huge-protocol",
        [
            '{"type":"hello","protocol":' + "9" * 300 + ',"node_version":"x",'
            '"device":{"os":"a","cpu":"b","ram_mb":1}}'
        ],
        CLOSE_UNSUPPORTED_VERSION,
    ),
    (
        "job-frame-from-node",
        [
            dumps(
                {
                    "type": "job",
                    "job_id": "j",
                    "model": MODEL,
                    "messages": [],
                    "params": {"max_tokens": 1, "temperature": 0, "top_p": 1},
                    "stream": True,
                }
            )
        ],
        CLOSE_BAD_FRAME,
    ),
    (
        "welcome-from-node",
        [dumps({"type": "welcome", "device_id": "x", "heartbeat_interval_s": 1})],
        CLOSE_BAD_FRAME,
    ),
    (
        "delta-before-hello",
        [dumps({"type": "delta", "job_id": "j1", "text": "hi"})],
        CLOSE_OUT_OF_ORDER,
    ),
    (
        "heartbeat-before-hello",
        [dumps({"type": "heartbeat", "active_jobs": 0})],
        CLOSE_OUT_OF_ORDER,
    ),
    ("hello-extra-field", [dumps(hello(admin=True))], CLOSE_BAD_FRAME),
    (
        "hello-extra-device-field",
        [dumps(hello(device={"os": "a", "cpu": "b", "ram_mb": 1, "root": True}))],
        CLOSE_BAD_FRAME,
    ),
    ("hello-unicode-extra-field", [dumps(hello(**{UNICODE_KEY: 1}))], CLOSE_BAD_FRAME),
    (
        "hello-missing-device",
        [dumps({k: v for k, v in hello().items() if k != "device"})],
        CLOSE_BAD_FRAME,
    ),
    ("negative-slots", [dumps(hello(slots=-1))], CLOSE_BAD_FRAME),
    ("zero-slots", [dumps(hello(slots=0))], CLOSE_BAD_FRAME),
    ("too-many-slots", [dumps(hello(slots=100_000))], CLOSE_BAD_FRAME),
    ("negative-ram", [dumps(hello(device={"os": "a", "cpu": "b", "ram_mb": -5}))], CLOSE_BAD_FRAME),
    ("huge-node-version", [dumps(hello(node_version="v" * 1_000_000))], CLOSE_BAD_FRAME),
    ("huge-region", [dumps(hello(region="r" * 100_000))], CLOSE_BAD_FRAME),
    ("huge-model-id", [dumps(hello(models=[{"id": "m" * 100_000}]))], CLOSE_BAD_FRAME),
    (
        "too-many-models",
        [dumps(hello(models=[{"id": f"m{i}"} for i in range(1000)]))],
        CLOSE_BAD_FRAME,
    ),
    ("bad-sha256", [dumps(hello(models=[{"id": MODEL, "sha256": "NOT-HEX"}]))], CLOSE_BAD_FRAME),
    # -- after a good hello ---------------------------------------------------------
    ("not-json-after-hello", [HELLO, "{{{{"], CLOSE_BAD_FRAME),
    ("binary-after-hello", [HELLO, b"\x00\x01\x02\xff\xfe"], CLOSE_BAD_FRAME),
    ("array-after-hello", [HELLO, "[1, 2, 3]"], CLOSE_BAD_FRAME),
    ("unknown-type-after-hello", [HELLO, dumps({"type": "reboot"})], CLOSE_BAD_FRAME),
    ("cancel-from-node", [HELLO, dumps({"type": "cancel", "job_id": "j"})], CLOSE_BAD_FRAME),
    ("second-hello", [HELLO, HELLO], CLOSE_OUT_OF_ORDER),
    ("second-hello-wrong-protocol", [HELLO, dumps(hello(protocol=99))], CLOSE_OUT_OF_ORDER),
    (
        "delta-unknown-job",
        [HELLO, dumps({"type": "delta", "job_id": "job_never", "text": "x"})],
        CLOSE_OUT_OF_ORDER,
    ),
    (
        "done-unknown-job",
        [
            HELLO,
            dumps({"type": "done", "job_id": "job_never", "finish_reason": "stop", "usage": USAGE}),
        ],
        CLOSE_OUT_OF_ORDER,
    ),
    (
        "error-unknown-job",
        [HELLO, dumps({"type": "error", "job_id": "job_never", "code": "X", "message": "y"})],
        CLOSE_OUT_OF_ORDER,
    ),
    (
        "unicode-unknown-job-id",
        [HELLO, dumps({"type": "delta", "job_id": "😀" * 64, "text": "x"})],
        CLOSE_OUT_OF_ORDER,
    ),
    (
        "huge-delta-unknown-job",
        [HELLO, dumps({"type": "delta", "job_id": "j", "text": "x" * 2_000_000})],
        CLOSE_OUT_OF_ORDER,
    ),
    (
        "huge-job-id",
        [HELLO, dumps({"type": "delta", "job_id": "j" * 100_000, "text": "x"})],
        CLOSE_BAD_FRAME,
    ),
    (
        "negative-tokens",
        [HELLO, dumps({"type": "delta", "job_id": "j", "text": "x", "tokens": -3})],
        CLOSE_BAD_FRAME,
    ),
    (
        "bad-finish-reason",
        [
            HELLO,
            dumps({"type": "done", "job_id": "j", "finish_reason": "exploded", "usage": USAGE}),
        ],
        CLOSE_BAD_FRAME,
    ),
    (
        "delta-extra-field",
        [HELLO, dumps({"type": "delta", "job_id": "j", "text": "x", "sudo": True})],
        CLOSE_BAD_FRAME,
    ),
    (
        "heartbeat-negative-jobs",
        [HELLO, dumps({"type": "heartbeat", "active_jobs": -1})],
        CLOSE_BAD_FRAME,
    ),
    (
        "heartbeat-huge-pause-reason",
        [
            HELLO,
            dumps(
                {
                    "type": "heartbeat",
                    "active_jobs": 0,
                    "paused": True,
                    "pause_reason": "p" * 100_000,
                }
            ),
        ],
        CLOSE_BAD_FRAME,
    ),
    (
        "huge-error-message",
        [HELLO, dumps({"type": "error", "job_id": "j", "code": "X", "message": "m" * 100_000})],
        CLOSE_BAD_FRAME,
    ),
]


@pytest.mark.parametrize(("frames", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_hostile_frames_close_only_that_connection(
    live: LiveGateway, frames: list[Raw], expected: int
) -> None:
    device_id, token = await live.device_token()
    code, reason, received = await exchange(live.ws_url, token, frames)
    assert code == expected, (code, reason)
    assert reason.strip(), "a close without a reason"
    assert len(reason.encode()) <= 123
    if frames[0] is HELLO:
        assert orjson.loads(received[0])["type"] == "welcome"
    await wait_gone(live, device_id)
    await assert_gateway_healthy(live)


async def test_healthy_device_connected_before_keeps_serving(live: LiveGateway) -> None:
    """A device already serving is not disturbed by a neighbour's garbage."""
    await live.add_sim_device(length=4)
    _, token = await live.device_token()
    _, key = await live.developer_key()
    for frames in (["garbage"], [HELLO, "garbage"], [HELLO, HELLO]):
        code, _, _ = await exchange(live.ws_url, token, frames)
        assert code in (CLOSE_BAD_FRAME, CLOSE_OUT_OF_ORDER)
        async with live.client(key) as client:
            reply = await client.post(
                "/v1/chat/completions",
                json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
            )
        assert reply.status_code == 200
    assert len(live.gateway.registry.devices()) == 1


@pytest.mark.parametrize(
    "token",
    [None, "", "sg_dev_wrong", "sg_dev_" + "A" * 43, "sg_live_notadevicetoken", "x" * 5000],
    ids=["missing", "empty", "wrong", "well-formed-unknown", "api-key-shape", "huge"],
)
async def test_bad_device_token_is_refused_with_4001(live: LiveGateway, token: str | None) -> None:
    code, reason, received = await exchange(live.ws_url, token, [HELLO])
    assert code == CLOSE_UNAUTHORIZED
    assert reason.strip()
    assert received == []
    assert live.gateway.registry.devices() == []
    await assert_gateway_healthy(live)


async def test_revoked_style_token_of_another_kind_is_refused(live: LiveGateway) -> None:
    """A developer API key is not a device token."""
    _, key = await live.developer_key()
    code, _, _ = await exchange(live.ws_url, key, [HELLO])
    assert code == CLOSE_UNAUTHORIZED


@pytest.mark.parametrize(
    ("frames", "expected"),
    [
        (["x" * 3000], CLOSE_FRAME_TOO_LARGE),
        ([b"\x00" * 3000], CLOSE_FRAME_TOO_LARGE),
        (["é" * 1500], CLOSE_FRAME_TOO_LARGE),  # 1500 characters, 3000 bytes
        ([dumps(hello(node_version="v" * 3000))], CLOSE_FRAME_TOO_LARGE),
        (
            [HELLO, dumps({"type": "delta", "job_id": "j", "text": "x" * 3000})],
            CLOSE_FRAME_TOO_LARGE,
        ),
        (
            [HELLO, dumps({"type": "delta", "job_id": "j", "text": "é" * 1500})],
            CLOSE_FRAME_TOO_LARGE,
        ),
        ([HELLO, "x" * 2048], CLOSE_BAD_FRAME),  # exactly at the limit is parsed, not refused
    ],
    ids=[
        "text-before-hello",
        "binary-before-hello",
        "multibyte-before-hello",
        "big-hello",
        "big-delta",
        "multibyte-delta",
        "at-limit",
    ],
)
async def test_frame_larger_than_the_limit_closes_with_4009(
    tmp_path: Path, frames: list[Raw], expected: int
) -> None:
    live = await start_gateway(fast_settings(tmp_path, max_frame_bytes=2048))
    try:
        device_id, token = await live.device_token()
        code, reason, _ = await exchange(live.ws_url, token, frames)
        assert code == expected, (code, reason)
        assert reason.strip()
        if expected == CLOSE_FRAME_TOO_LARGE:
            assert "2048" in reason
        await wait_gone(live, device_id)
        await assert_gateway_healthy(live)
    finally:
        await stop_gateway(live)


async def test_device_dying_mid_job_does_not_touch_another_devices_stream(
    live: LiveGateway,
) -> None:
    steady = await live.add_sim_device(length=20, tokens_per_s=10)
    _, key = await live.developer_key()
    async with live.client(key) as client:
        first_chunk = asyncio.Event()

        async def steady_stream() -> tuple[int, list[dict[str, Any]]]:
            chunks: list[dict[str, Any]] = []
            async with client.stream(
                "POST",
                "/v1/chat/completions",
                json={
                    "model": MODEL,
                    "stream": True,
                    "messages": [{"role": "user", "content": "steady"}],
                },
            ) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        chunks.append(orjson.loads(line[6:]))
                        first_chunk.set()
                return response.status_code, chunks

        steady_task = asyncio.create_task(steady_stream())
        await asyncio.wait_for(first_chunk.wait(), 5)
        # The steady device is busy (one slot), so the next request lands on the dying one.
        await live.add_sim_device(length=20, die_after_tokens=2, tokens_per_s=40)
        doomed = await client.post(
            "/v1/chat/completions",
            json={
                "model": MODEL,
                "stream": True,
                "messages": [{"role": "user", "content": "doomed"}],
            },
        )
        assert not steady_task.done(), "the steady stream should still be running"
        status, chunks = await asyncio.wait_for(steady_task, 10)

    # The dying device's stream was cut after its first tokens and says so.
    assert doomed.status_code == 200
    doomed_frames = [line[6:] for line in doomed.text.splitlines() if line.startswith("data: ")]
    assert any('"STREAM_INTERRUPTED"' in frame for frame in doomed_frames), doomed_frames
    # The steady device's stream is whole.
    assert status == 200
    assert all("error" not in chunk for chunk in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "".join(sim_answer(MODEL, "steady", None, 20))
    finishes = [
        c["choices"][0]["finish_reason"]
        for c in chunks
        if c["choices"] and c["choices"][0]["finish_reason"]
    ]
    assert finishes == ["stop"]
    assert steady.stats.jobs_done == 1
    async with live.client() as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
