"""Orchestrated chat completions and /v1/workflows over real sockets, with ``sim``
devices (and scripted ones that answer in the agent's format)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from sqlalchemy import select, update

from swarmgate.accounts import service
from swarmgate.node.agent import NodeAgent
from swarmgate.node.backends.base import Finished, GenerationRequest, TokenDelta
from swarmgate.node.backends.sim import SimBackend, SimConfig
from swarmgate.protocol import DeviceFacts
from swarmgate.store.tables import api_keys, charges
from tests.billing.test_request_billing import priced_catalog
from tests.conftest import MODEL, LiveGateway, fast_settings, start_gateway, stop_gateway


@pytest.fixture
async def priced(tmp_path: Path) -> AsyncIterator[LiveGateway]:
    live = await start_gateway(fast_settings(tmp_path, catalog_path=priced_catalog(tmp_path)))
    try:
        yield live
    finally:
        await stop_gateway(live)


def ask(content: str, **orchestration: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 16,
        "orchestration": {"enabled": True, **orchestration},
    }


def sse(text: str) -> list[Any]:
    return [
        line[6:] if line[6:] == "[DONE]" else orjson.loads(line[6:])
        for line in text.splitlines()
        if line.startswith("data: ")
    ]


class Scripted(SimBackend):
    """A device that answers ``reply(prompt text)``, word by word."""

    def __init__(self, reply: Any) -> None:
        super().__init__(SimConfig())
        self.reply = reply

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Any]:  # type: ignore[override]
        text = self.reply("\n".join(m.content for m in request.messages))
        words = text.split(" ")
        for i, word in enumerate(words):
            yield TokenDelta(word if i == 0 else " " + word)
        yield Finished(finish_reason="stop", prompt_tokens=20, completion_tokens=len(words))


async def add_scripted(live: LiveGateway, reply: Any) -> None:
    device_id, token = await live.device_token()
    agent = NodeAgent(
        gateway_url=live.ws_url,
        token=token,
        backend=Scripted(reply),
        models=[MODEL],
        facts=DeviceFacts(os="sim", cpu="sim", ram_mb=1024),
        reconnect_min_s=0.05,
        reconnect_max_s=0.5,
    )
    stop = asyncio.Event()
    live.agents.append((agent, stop, asyncio.create_task(agent.run(stop))))
    await live.wait_for_device(device_id)
    while not live.gateway.registry.has_model(MODEL):
        await asyncio.sleep(0.01)


async def test_research_runs_three_charged_steps_and_is_listed(priced: LiveGateway) -> None:
    live = priced
    await live.add_sim_device()
    _, key = await live.developer_key()
    async with live.client(key) as client:
        reply = await client.post(
            "/v1/chat/completions", json=ask("Research otters", workflow="research")
        )
        assert reply.status_code == 200, reply.text
        body = reply.json()
        info = body["swarmgate"]["workflow"]
        assert info["type"] == "research" and info["status"] == "completed"
        assert info["steps_executed"] == 3 and body["choices"][0]["message"]["content"]
        assert reply.headers["x-workflow-id"] == info["id"]
        listed = (await client.get("/v1/workflows")).json()
        assert listed["total"] == 1 and listed["workflows"][0]["id"] == info["id"]
        assert listed["workflows"][0]["status"] == "COMPLETED"
        run = (await client.get(f"/v1/workflows/{info['id']}")).json()
        assert [s["name"] for s in run["steps"]] == ["research", "analyze", "write"]
        for step in run["steps"]:
            assert step["status"] == "succeeded" and step["device_id"] and step["model"] == MODEL
            assert step["completion_tokens"] > 0 and step["cost_micros"] > 0
            assert step["duration_ms"] >= 0
        missing = await client.get("/v1/workflows/wf_nope")
        assert missing.status_code == 404
    # Each step is a charge of its own; together they are the run's cost.
    await live.gateway.billing.writer.posted()
    async with live.gateway.engine.connect() as conn:
        rows = (await conn.execute(select(charges.c.job_id, charges.c.cost_micros))).all()
    steps = {s["job_id"]: s["cost_micros"] for s in run["steps"]}
    assert {r.job_id: r.cost_micros for r in rows} == steps
    assert sum(steps.values()) == info["total_cost_micros"] == run["total_cost_micros"]


async def test_streaming_sends_step_progress_then_the_answer(live: LiveGateway) -> None:
    await live.add_sim_device()
    _, key = await live.developer_key()
    async with live.client(key) as client:
        reply = await client.post(
            "/v1/chat/completions",
            json={
                **ask("Write a function", workflow="code"),
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
    events = sse(reply.text)
    assert events[-1] == "[DONE]"
    progress = [
        e["swarmgate"]["workflow_step"]["name"]
        for e in events[:-1]
        if "workflow_step" in e.get("swarmgate", {})
    ]
    assert progress == ["plan", "implement", "review"]
    text = "".join(
        e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e.get("choices")
    )
    closing = [e for e in events[:-1] if e.get("choices") and e["choices"][0]["finish_reason"]]
    assert text and closing[0]["swarmgate"]["workflow"]["status"] == "completed"
    assert events[-2]["usage"]["total_tokens"] > 0
    # Progress comes before any content.
    first_content = next(
        i
        for i, e in enumerate(events[:-1])
        if e.get("choices") and e["choices"][0]["delta"].get("content")
    )
    last_progress = max(
        i for i, e in enumerate(events[:-1]) if "workflow_step" in e.get("swarmgate", {})
    )
    assert last_progress < first_content


async def test_budgets_stop_runs_with_a_clear_status(priced: LiveGateway) -> None:
    live = priced
    await live.add_sim_device()
    _, key = await live.developer_key()
    async with live.client(key) as client:
        two = await client.post(
            "/v1/chat/completions", json=ask("Research", workflow="research", max_steps=2)
        )
        assert two.status_code == 200
        info = two.json()["swarmgate"]["workflow"]
        assert info["status"] == "stopped" and info["stop_reason"] == "max_steps"
        assert info["steps_executed"] == 2 and two.json()["choices"][0]["finish_reason"] == "length"
        nothing = await client.post(
            "/v1/chat/completions", json=ask("Research", workflow="research", max_cost_usd=0.000001)
        )
        assert nothing.status_code == 400
        error = nothing.json()["error"]
        assert error["code"] == "ORCHESTRATION_BUDGET_TOO_LOW"
        assert error["param"] == "orchestration.max_cost_usd"
        streamed = await client.post(
            "/v1/chat/completions",
            json={
                **ask("Research", workflow="research", max_cost_usd=0.000001),
                "stream": True,
            },
        )
        assert streamed.status_code == 400
        assert streamed.json()["error"]["code"] == "ORCHESTRATION_BUDGET_TOO_LOW"
        capped = await client.post(
            "/v1/chat/completions", json=ask("Research", workflow="research", max_cost_micros=1500)
        )
        assert capped.status_code in (200, 400)
        if capped.status_code == 200:
            assert capped.json()["swarmgate"]["workflow"]["total_cost_micros"] <= 1500
    await live.gateway.billing.writer.posted()
    async with live.gateway.engine.connect() as conn:
        jobs = {r.job_id for r in (await conn.execute(select(charges.c.job_id))).all()}
    assert len(jobs) == 2 + (
        capped.json()["swarmgate"]["workflow"]["steps_executed"] if capped.status_code == 200 else 0
    )


async def test_a_failing_device_is_failed_over_within_a_step(live: LiveGateway) -> None:
    await live.add_sim_device(fail_rate=1.0)
    await live.add_sim_device()
    _, key = await live.developer_key()
    async with live.client(key) as client:
        for _ in range(3):
            reply = await client.post(
                "/v1/chat/completions", json=ask("Research", workflow="research")
            )
            assert reply.status_code == 200, reply.text
            assert reply.json()["swarmgate"]["workflow"]["status"] == "completed"


async def test_a_step_whose_devices_all_fail_ends_the_run(live: LiveGateway) -> None:
    await live.add_sim_device(fail_rate=1.0)
    _, key = await live.developer_key()
    async with live.client(key) as client:
        reply = await client.post("/v1/chat/completions", json=ask("Research", workflow="research"))
        assert reply.status_code == 502
        listed = (await client.get("/v1/workflows")).json()
    assert listed["workflows"][0]["status"] == "FAILED"


def react_device(prompt: str) -> str:
    found = re.findall(r"^Observation: (\S+)", prompt, re.M)
    if found:
        return f"Thought: done\nFinal Answer: the result is {found[-1]}"
    if "get_weather" in prompt and "Oslo" in prompt:
        return 'Thought: ask\nAction: get_weather\nAction Input: {"city": "Oslo"}'
    return 'Thought: compute\nAction: calculator\nAction Input: {"expression": "17 * 23"}'


async def test_the_agent_runs_the_calculator_on_the_gateway(live: LiveGateway) -> None:
    await add_scripted(live, react_device)
    _, key = await live.developer_key()
    async with live.client(key) as client:
        reply = await client.post("/v1/chat/completions", json=ask("What is 17 * 23?"))
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["swarmgate"]["workflow"]["type"] == "agent"  # chosen by auto
        assert "391" in body["choices"][0]["message"]["content"]
        run = (await client.get(f"/v1/workflows/{body['swarmgate']['workflow']['id']}")).json()
    assert [s["tool"] for s in run["steps"]] == ["calculator", None]


async def test_the_agent_hands_the_clients_tools_back_as_tool_calls(live: LiveGateway) -> None:
    await add_scripted(live, react_device)
    _, key = await live.developer_key()
    sdk = live.sdk(key)
    tools: list[Any] = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    first = await sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the weather in Oslo?"}],
        tools=tools,
        extra_body={"orchestration": {"workflow": "agent"}},
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and "Oslo" in call.function.arguments
    # The client runs its tool and sends the result back, as with OpenAI.
    second = await sdk.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "user", "content": "What is the weather in Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "Observation: sunny"},
        ],
        tools=tools,
        extra_body={"orchestration": {"workflow": "agent"}},
    )
    assert second.choices[0].finish_reason == "stop"
    assert "sunny" in (second.choices[0].message.content or "")


async def test_map_reduce_spreads_its_maps_over_devices(live: LiveGateway) -> None:
    for _ in range(3):
        await live.add_sim_device(ttft_ms=50, context_length=2048)
    _, key = await live.developer_key()
    text = "\n\n".join(f"Part {i}: " + "the fox jumps over the dog " * 200 for i in range(6))
    async with live.client(key) as client:
        reply = await client.post(
            "/v1/chat/completions", json=ask(text, workflow="map_reduce", max_steps=50)
        )
        assert reply.status_code == 200, reply.text
        run = (
            await client.get(f"/v1/workflows/{reply.json()['swarmgate']['workflow']['id']}")
        ).json()
    maps = [s for s in run["steps"] if s["name"].startswith("map")]
    assert len(maps) >= 3 and run["steps"][-1]["name"] == "reduce (final)"
    assert len({s["device_id"] for s in maps}) > 1


async def test_the_keys_auto_orchestration_default(live: LiveGateway) -> None:
    await live.add_sim_device()
    account = await service.create_account(
        live.gateway.engine, name="auto", credit_micros=5_000_000
    )
    key = await service.create_api_key(live.gateway.engine, account_id=account["id"])
    async with live.gateway.engine.begin() as conn:
        await conn.execute(
            update(api_keys).where(api_keys.c.id == key.id).values(auto_orchestration=True)
        )
    async with live.client(key.secret) as client:
        plain = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me about otters"}]}
        reply = await client.post("/v1/chat/completions", json=plain)
        assert reply.json()["swarmgate"]["workflow"]["type"] == "research"
        off = await client.post(
            "/v1/chat/completions", json={**plain, "orchestration": {"enabled": False}}
        )
        assert "workflow" not in off.json()["swarmgate"]


async def test_the_orchestration_rate_multiplies_step_prices(tmp_path: Path) -> None:
    live = await start_gateway(
        fast_settings(
            tmp_path, catalog_path=priced_catalog(tmp_path), orchestration_rate_bps=15_000
        )
    )
    try:
        await live.add_sim_device()
        _, key = await live.developer_key()
        async with live.client(key) as client:
            reply = await client.post(
                "/v1/chat/completions", json=ask("Research", workflow="research")
            )
            run = (
                await client.get(f"/v1/workflows/{reply.json()['swarmgate']['workflow']['id']}")
            ).json()
        for step in run["steps"]:
            # priced_catalog: 1 micro per input token, 2 per output token; times 1.5
            expected = -(
                -(step["prompt_tokens"] * 1_500_000 + step["completion_tokens"] * 3_000_000)
                // 1_000_000
            )
            assert step["cost_micros"] == expected
    finally:
        await stop_gateway(live)


@pytest.mark.parametrize(
    ("orchestration", "status", "param"),
    [
        ({"workflow": "nope"}, 400, "orchestration.workflow"),
        ({"max_steps": 0}, 400, "orchestration.max_steps"),
        ({"max_cost_usd": -1}, 400, "orchestration.max_cost_usd"),
        ({"max_cost_usd": "1"}, 400, "orchestration.max_cost_usd"),
        ({"colour": "red"}, 400, "orchestration.colour"),
    ],
)
async def test_bad_orchestration_fields(
    live: LiveGateway, orchestration: dict[str, Any], status: int, param: str
) -> None:
    await live.add_sim_device()
    _, key = await live.developer_key()
    async with live.client(key) as client:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "x"}],
            "orchestration": orchestration,
        }
        reply = await client.post("/v1/chat/completions", json=body)
    assert reply.status_code == status, reply.text
    assert reply.json()["error"]["param"].startswith(param)


async def test_estimates(live: LiveGateway) -> None:
    _, key = await live.developer_key()
    async with live.client(key) as client:
        plain = await client.post(
            "/v1/workflows/estimate", json={"model": MODEL, "workflow": "research"}
        )
        assert plain.status_code == 200, plain.text
        body = plain.json()
        assert body["steps"] == {"min": 3, "max": 3} and body["input_assumed"] is True
        low, high = body["estimated_cost_micros"]["min"], body["estimated_cost_micros"]["max"]
        assert 0 <= low <= high
        long_input = await client.post(
            "/v1/workflows/estimate",
            json={"model": MODEL, "input": "word " * 20_000},
        )
        assert long_input.json()["workflow"] == "map_reduce" and long_input.json()["chosen_because"]
        unknown = await client.post("/v1/workflows/estimate", json={"model": "nope"})
        assert unknown.status_code == 404
        bad = await client.post("/v1/workflows/estimate", json={"model": MODEL, "workflow": "x"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "workflow"


async def test_an_orchestrated_answer_joins_its_conversation(live: LiveGateway) -> None:
    await live.add_sim_device()
    _, key = await live.developer_key()
    async with live.client(key) as client:
        conversation_id = (await client.post("/v1/conversations", json={})).json()["id"]
        body = {**ask("Research otters", workflow="research"), "conversation_id": conversation_id}
        reply = await client.post("/v1/chat/completions", json=body)
        assert reply.status_code == 200, reply.text
        assert reply.json()["swarmgate"]["conversation_id"] == conversation_id
        await live.gateway.memory.settled()
        got = (await client.get(f"/v1/conversations/{conversation_id}")).json()
    answer = reply.json()["choices"][0]["message"]["content"]
    assert [(m["role"], m["content"]) for m in got["messages"]] == [
        ("user", "Research otters"),
        ("assistant", answer),
    ]


async def test_a_stream_that_fails_before_its_first_step_is_a_plain_http_error(
    live: LiveGateway,
) -> None:
    await live.add_sim_device(fail_rate=1.0)
    _, key = await live.developer_key()
    async with live.client(key) as client:
        failing = await client.post(
            "/v1/chat/completions", json={**ask("Research", workflow="research"), "stream": True}
        )
        assert failing.status_code == 502
        assert failing.json()["error"]["code"] == "ALL_ATTEMPTS_FAILED"


@pytest.mark.parametrize("offset", ["-1", "1000000001", "9798158970401135859335168", "x"])
async def test_listing_refuses_an_offset_out_of_range(live: LiveGateway, offset: str) -> None:
    _account, key = await live.developer_key()
    async with live.client(key) as client:
        response = await client.get("/v1/workflows", params={"offset": offset})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "offset"
