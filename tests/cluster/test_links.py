"""Direct links between gateways (``cluster/links.py``): attempts cross over them instead
of Redis pub/sub, a wrong secret gets no link (Redis still carries everything), and a
link that breaks mid-stream fails its attempts over like a dead gateway."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import select

from swarmgate.cluster.links import Link, Links
from swarmgate.cluster.mesh import Mesh
from swarmgate.store.tables import charges
from tests.cluster.conftest import Pair, cluster_settings, wait_remote
from tests.cluster.test_mesh import _device, chat_body
from tests.conftest import start_gateway, stop_gateway

SECRET = "a shared secret for the test network"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def linked_settings(tmp_path: Path, pg_url: str, prefix: str, name: str, **extra: Any) -> Any:
    values: dict[str, Any] = {
        "cluster_link_port": free_port(),
        "cluster_link_bind": "127.0.0.1",
        "cluster_link_host": "127.0.0.1",
        "cluster_secret": SECRET,
    }
    values.update(extra)
    return cluster_settings(tmp_path / name, pg_url, prefix, name, **values)


@pytest.fixture
async def linked(tmp_path: Path, pg_url: str, redis_prefix: str) -> AsyncIterator[Pair]:
    a = await start_gateway(linked_settings(tmp_path, pg_url, redis_prefix, "gw-a"))
    b = await start_gateway(linked_settings(tmp_path, pg_url, redis_prefix, "gw-b"))
    try:
        yield Pair(a, b)
    finally:
        await stop_gateway(b)
        await stop_gateway(a)


def mesh_of(pair: Pair, side: str) -> Mesh:
    mesh = (pair.a if side == "a" else pair.b).gateway.mesh
    assert mesh is not None and mesh.links is not None
    return mesh


async def wait_linked(pair: Pair, timeout: float = 5.0) -> tuple[Link, Link]:
    links_a, links_b = mesh_of(pair, "a").links, mesh_of(pair, "b").links
    assert links_a is not None and links_b is not None
    deadline = asyncio.get_running_loop().time() + timeout
    while (links_a.get("gw-b") is None or links_b.get("gw-a") is None) and (
        asyncio.get_running_loop().time() < deadline
    ):
        await asyncio.sleep(0.02)
    a_to_b, b_to_a = links_a.get("gw-b"), links_b.get("gw-a")
    assert a_to_b is not None and b_to_a is not None, "the gateways never linked"
    return a_to_b, b_to_a


async def test_attempts_cross_over_the_link(linked: Pair) -> None:
    a_to_b, b_to_a = await wait_linked(linked)
    dev_b = await _device(linked.b)
    await wait_remote(linked.a, dev_b)
    _account, key = await linked.a.developer_key()
    sent, received = a_to_b.sent, b_to_a.sent
    async with linked.a.client(key) as client:
        answer = await client.post(
            "/v1/chat/completions", json=chat_body(allow_hosters=[dev_b], max_tokens=12)
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["swarmgate"]["device_id"] == dev_b
        async with client.stream(
            "POST",
            "/v1/chat/completions",
            json=chat_body(allow_hosters=[dev_b], max_tokens=12, stream=True),
        ) as streamed:
            lines = [line async for line in streamed.aiter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    text = "".join(
        orjson.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        for line in lines[:-1]
        if orjson.loads(line[6:])["choices"]
    )
    assert text == answer.json()["choices"][0]["message"]["content"]
    # Both jobs went over the link, and every frame of both answers came back on it.
    assert a_to_b.sent - sent == 2
    assert b_to_a.sent - received >= 2 + 12
    async with linked.a.gateway.engine.connect() as conn:
        rows = (await conn.execute(select(charges.c.device_id))).all()
    assert [r.device_id for r in rows] == [dev_b, dev_b]


async def test_a_wrong_secret_gets_no_link_and_redis_carries_the_attempts(
    tmp_path: Path, pg_url: str, redis_prefix: str
) -> None:
    a = await start_gateway(linked_settings(tmp_path, pg_url, redis_prefix, "gw-a"))
    b = await start_gateway(
        linked_settings(tmp_path, pg_url, redis_prefix, "gw-b", cluster_secret="x" * 32)
    )
    try:
        dev_b = await _device(b)
        await wait_remote(a, dev_b)
        await asyncio.sleep(0.5)  # a few liveness ticks: A tried to dial B and was refused
        links_a = a.gateway.mesh.links  # type: ignore[union-attr]
        links_b = b.gateway.mesh.links  # type: ignore[union-attr]
        assert links_a is not None and links_b is not None
        assert links_a.get("gw-b") is None and links_b.get("gw-a") is None
        _account, key = await a.developer_key()
        async with a.client(key) as client:
            answer = await client.post(
                "/v1/chat/completions", json=chat_body(allow_hosters=[dev_b], max_tokens=8)
            )
        assert answer.status_code == 200, answer.text
    finally:
        await stop_gateway(b)
        await stop_gateway(a)


async def test_a_link_that_breaks_mid_stream_fails_over(linked: Pair) -> None:
    a_to_b, _ = await wait_linked(linked)
    dev_b = await _device(linked.b, tokens_per_s=25, length=60)
    await wait_remote(linked.a, dev_b)
    _account, key = await linked.a.developer_key()
    reference_device = await _device(linked.a)
    async with linked.a.client(key) as client:
        reference = await client.post(
            "/v1/chat/completions", json=chat_body(allow_hosters=[reference_device], max_tokens=60)
        )
    full = reference.json()["choices"][0]["message"]["content"]
    await linked.a.stop_agents()
    while linked.a.gateway.registry.get(reference_device) is not None:
        await asyncio.sleep(0.02)

    received: list[str] = []
    last: dict[str, Any] = {}
    async with (
        linked.a.client(key) as client,
        client.stream(
            "POST", "/v1/chat/completions", json=chat_body(max_tokens=60, stream=True)
        ) as streamed,
    ):
        assert streamed.status_code == 200
        async for line in streamed.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = orjson.loads(line[6:])
            if chunk["choices"]:
                received.append(chunk["choices"][0]["delta"].get("content") or "")
            if len(received) == 5 and not a_to_b.closed:
                await _device(linked.a)  # somewhere to continue
                a_to_b.close()  # the connection between the gateways breaks
            last = chunk
    assert "".join(received) == full  # continued, nothing repeated or missing
    assert last["swarmgate"]["attempts"] >= 2
    # B stopped the job it could no longer answer, and the gateways link again.
    holder = linked.b.gateway.registry.get(dev_b)
    assert holder is not None
    for _ in range(100):
        if not holder.active:
            break
        await asyncio.sleep(0.02)
    assert holder.active == {}
    await wait_linked(linked)
    async with linked.a.gateway.engine.connect() as conn:
        charged = (await conn.execute(select(charges.c.job_id))).all()
    assert len(charged) == 1 + 2  # the reference answer; the stream's two parts


async def test_the_handshake_refuses_strangers_and_oversized_frames() -> None:
    seen: list[bytes] = []
    lost: list[str] = []
    server = Links(
        "gw-b",
        secret=SECRET,
        port=0,
        bind="127.0.0.1",
        host="127.0.0.1",
        max_frame_bytes=1024,
        on_message=lambda data, _link: seen.append(data),
        on_lost=lambda link: lost.append(link.peer),
    )
    await server.start()
    try:
        host, port = server.address.split(":")
        # Not speaking the protocol: closed without a link.
        reader, writer = await asyncio.open_connection(host, int(port))
        greeting = await reader.readexactly(4 + 16)
        assert greeting.startswith(b"SGL1")
        writer.write(b"\x00\x00\x00\x05hello")
        assert await reader.read() == b""
        writer.close()
        assert server.get("hello") is None
        # A proper peer links, and its messages arrive; a frame over the limit ends it.
        client = Links(
            "gw-a",
            secret=SECRET,
            port=0,
            bind="127.0.0.1",
            host="127.0.0.1",
            max_frame_bytes=1024,
            on_message=lambda data, _link: None,
            on_lost=lambda _link: None,
        )
        await client.start()
        try:
            client.keep_up({"gw-b": server.address})
            for _ in range(100):
                if server.get("gw-a") is not None and client.get("gw-b") is not None:
                    break
                await asyncio.sleep(0.01)
            link = client.get("gw-b")
            assert link is not None
            assert link.send(b"F|gw-a|dev|{}")
            for _ in range(100):
                if seen:
                    break
                await asyncio.sleep(0.01)
            assert seen == [b"F|gw-a|dev|{}"]
            assert link.send(b"x" * 2048)
            for _ in range(100):
                if lost:
                    break
                await asyncio.sleep(0.01)
            assert lost == ["gw-a"]
        finally:
            await client.stop()
    finally:
        await server.stop()
