"""Two gateways on one PostgreSQL and one Redis, in this process: presence, requests that
cross from one gateway to a device on the other (streamed and not), cancellation
crossing back, and a gateway that stops answering while it holds a running stream."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import orjson
from redis.asyncio import Redis
from sqlalchemy import func, select

from swarmgate.cluster.mesh import RemoteDevice
from swarmgate.routing.states import ConnectionState
from swarmgate.store.tables import charges
from tests.cluster.conftest import Pair, wait_remote
from tests.conftest import MODEL, LiveGateway


def chat_body(**fields: object) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story"}], **fields}


async def _device(live: LiveGateway, **config: object) -> str:
    agent = await live.add_sim_device(**config)  # type: ignore[arg-type]
    assert agent.stats.device_id is not None
    return agent.stats.device_id


async def test_presence_reaches_every_gateway(
    pair: Pair, redis_client: Redis, redis_prefix: str
) -> None:
    dev_a = await _device(pair.a, slots=2)
    dev_b = await _device(pair.b)
    remote_b = await wait_remote(pair.a, dev_b)
    remote_a = await wait_remote(pair.b, dev_a)
    assert isinstance(remote_b, RemoteDevice) and remote_b.holder == "gw-b"
    assert isinstance(remote_a, RemoteDevice) and remote_a.holder == "gw-a"
    assert remote_a.slots == 2 and remote_a.models == frozenset({MODEL})
    assert pair.a.gateway.registry.device_count(MODEL) == 2
    # The index by model, and the records' TTLs.
    assert pair.a.gateway.mesh is not None
    assert await pair.a.gateway.mesh.devices_for(MODEL) == {dev_a, dev_b}
    record = orjson.loads(await redis_client.get(f"{redis_prefix}dev:{dev_b}"))
    assert record["gateway"] == "gw-b" and record["models"] == [MODEL]
    assert 0 < await redis_client.ttl(f"{redis_prefix}dev:{dev_b}") <= 10
    assert 0 < await redis_client.pttl(f"{redis_prefix}gw:gw-a") <= 1000
    keys = [k.decode() async for k in redis_client.scan_iter(match=f"{redis_prefix}*")]
    assert keys and all(k.startswith(redis_prefix) for k in keys)

    # A device that leaves its gateway leaves every gateway.
    await pair.b.stop_agents()
    deadline = time.monotonic() + 5
    while pair.a.gateway.registry.get(dev_b) is not None:
        assert time.monotonic() < deadline, "the departed device is still listed"
        await asyncio.sleep(0.02)
    assert await pair.a.gateway.mesh.devices_for(MODEL) == {dev_a}


async def test_requests_cross_to_a_device_on_the_other_gateway(pair: Pair) -> None:
    dev_a = await _device(pair.a)
    dev_b = await _device(pair.b, tokens_per_s=200)
    await wait_remote(pair.a, dev_b)
    await wait_remote(pair.b, dev_a)
    _account, key = await pair.a.developer_key()

    async with pair.a.client(key) as client_a, pair.b.client(key) as client_b:
        crossing = await client_a.post(
            "/v1/chat/completions", json=chat_body(allow_hosters=[dev_b], max_tokens=12)
        )
        back = await client_b.post(
            "/v1/chat/completions", json=chat_body(allow_hosters=[dev_a], max_tokens=12)
        )
        direct = await client_b.post(
            "/v1/chat/completions", json=chat_body(allow_hosters=[dev_b], max_tokens=12)
        )
        for response in (crossing, back, direct):
            assert response.status_code == 200, response.text
        assert crossing.json()["swarmgate"]["device_id"] == dev_b
        assert back.json()["swarmgate"]["device_id"] == dev_a
        # The same deterministic answer whichever gateway the request came to.
        assert (
            crossing.json()["choices"][0]["message"]["content"]
            == direct.json()["choices"][0]["message"]["content"]
        )

        # Streamed across: every delta in order, then the usage.
        async with client_a.stream(
            "POST",
            "/v1/chat/completions",
            json=chat_body(
                allow_hosters=[dev_b],
                max_tokens=12,
                stream=True,
                stream_options={"include_usage": True},
            ),
        ) as streamed:
            assert streamed.status_code == 200
            lines = [line async for line in streamed.aiter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        chunks = [orjson.loads(line[6:]) for line in lines[:-1]]
        text = "".join(
            c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]
        )
        assert text == direct.json()["choices"][0]["message"]["content"]
        assert chunks[-1]["usage"]["completion_tokens"] == 12

    # Each answer charged once, in the one shared database, to the serving device.
    async with pair.a.gateway.engine.connect() as conn:
        rows = (await conn.execute(select(charges.c.job_id, charges.c.device_id))).all()
    assert len(rows) == 4 and len({r.job_id for r in rows}) == 4
    assert Counter(r.device_id for r in rows) == {dev_b: 3, dev_a: 1}
    assert pair.a.gateway.registry.get(dev_b).free_slots == 1  # type: ignore[union-attr]
    assert pair.b.gateway.registry.get(dev_b).free_slots == 1  # type: ignore[union-attr]


async def test_load_on_both_gateways_uses_devices_on_both(pair: Pair) -> None:
    devices_a = [await _device(pair.a, tokens_per_s=400, slots=4) for _ in range(2)]
    devices_b = [await _device(pair.b, tokens_per_s=400, slots=4) for _ in range(2)]
    for device_id in devices_b:
        await wait_remote(pair.a, device_id)
    for device_id in devices_a:
        await wait_remote(pair.b, device_id)
    _account, key = await pair.a.developer_key()
    async with pair.a.client(key) as client_a, pair.b.client(key) as client_b:

        async def one(i: int) -> tuple[str, str]:
            client = client_a if i % 2 else client_b
            response = await client.post("/v1/chat/completions", json=chat_body(max_tokens=8))
            assert response.status_code == 200, response.text
            return ("a" if i % 2 else "b"), response.json()["swarmgate"]["device_id"]

        served = await asyncio.gather(*(one(i) for i in range(48)))
    crossings = sum(
        1
        for came_to, device in served
        if (device in devices_b) == (came_to == "a")  # the device is on the other gateway
    )
    assert crossings >= 4, served
    async with pair.a.gateway.engine.connect() as conn:
        count = await conn.scalar(select(func.count()).select_from(charges))
    assert count == 48


async def test_cancellation_crosses_to_the_holding_gateway(pair: Pair) -> None:
    slow = await pair.b.add_sim_device(tokens_per_s=20, length=400)
    dev_b = slow.stats.device_id
    assert dev_b is not None
    await wait_remote(pair.a, dev_b)
    _account, key = await pair.a.developer_key()
    holder = pair.b.gateway.registry.get(dev_b)
    assert holder is not None
    async with (
        pair.a.client(key) as client,
        client.stream(
            "POST",
            "/v1/chat/completions",
            json=chat_body(allow_hosters=[dev_b], max_tokens=400, stream=True),
        ) as streamed,
    ):
        async for line in streamed.aiter_lines():
            if line.startswith("data: "):
                break  # the first token: now hang up
        assert holder.active, "the holder should be running the attempt"
    deadline = time.monotonic() + 5
    while holder.active:
        assert time.monotonic() < deadline, "the cancel never reached the holding gateway"
        await asyncio.sleep(0.02)
    # The device stopped generating: it finished no job, and nothing was charged.
    await asyncio.sleep(0.2)
    assert slow.stats.jobs_done == 0
    async with pair.a.gateway.engine.connect() as conn:
        assert await conn.scalar(select(func.count()).select_from(charges)) == 0


async def test_a_gateway_that_stops_answering_loses_its_devices_and_streams_continue(
    pair: Pair,
) -> None:
    """B holds the device of a stream that came to A; B goes silent (its Redis links cut,
    as when the process dies). A notices within its TTL, and the stream is continued on a
    device of A's own, seamlessly."""
    dev_b = await _device(pair.b, tokens_per_s=25, length=60)
    await wait_remote(pair.a, dev_b)
    _account, key = await pair.a.developer_key()
    reference_device = await _device(pair.a)
    async with pair.a.client(key) as client:
        reference = await client.post(
            "/v1/chat/completions",
            json=chat_body(allow_hosters=[reference_device], max_tokens=60),
        )
    assert reference.status_code == 200
    full = reference.json()["choices"][0]["message"]["content"]
    await pair.a.stop_agents()  # A's device goes; B's is the only one left
    while pair.a.gateway.registry.get(reference_device) is not None:
        await asyncio.sleep(0.02)

    mesh_b = pair.b.gateway.mesh
    assert mesh_b is not None
    received: list[str] = []
    silenced_at = 0.0
    async with (
        pair.a.client(key) as client,
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
            if len(received) == 5 and not silenced_at:
                for task in mesh_b._tasks:  # B dies, as far as the network can tell
                    task.cancel()
                silenced_at = time.monotonic()
                await _device(pair.a)  # a device A can continue on
            last = chunk
    assert "".join(received) == full  # nothing repeated, nothing missing
    assert last["swarmgate"]["attempts"] >= 2
    # The stream may have moved on by its stall timeout before the liveness check ran;
    # either way A drops B's devices within seconds.
    while pair.a.gateway.registry.get(dev_b) is not None:
        noticed = time.monotonic() - silenced_at
        assert noticed < 5, f"the dead gateway was not noticed in {noticed:.1f} s"
        await asyncio.sleep(0.02)


async def test_a_pause_reaches_the_other_gateway(pair: Pair) -> None:
    dev_b = await _device(pair.b)
    remote = await wait_remote(pair.a, dev_b)
    holder = pair.b.gateway.registry.get(dev_b)
    assert holder is not None and remote.state is ConnectionState.READY

    async def becomes(state: ConnectionState) -> None:
        deadline = time.monotonic() + 5
        while remote.state is not state:
            assert time.monotonic() < deadline, f"still {remote.state}, expected {state}"
            await asyncio.sleep(0.02)

    assert pair.b.gateway.registry.set_paused(holder, True, "battery below 20 %")
    pair.b.gateway.presence_changed(holder)
    await becomes(ConnectionState.PAUSED)
    assert remote.pause_reason == "battery below 20 %"
    assert not remote.accepting
    assert pair.b.gateway.registry.set_paused(holder, False, None)
    pair.b.gateway.presence_changed(holder)
    await becomes(ConnectionState.READY)
