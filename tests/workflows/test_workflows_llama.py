"""One real llama.cpp run of the research workflow."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import MODEL, fast_settings, start_gateway, stop_gateway


@pytest.mark.llama
async def test_research_with_a_real_model(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    live = await start_gateway(
        fast_settings(tmp_path, first_token_timeout_s=60.0, token_stall_timeout_s=60.0)
    )
    try:
        device_id, _ = await live.add_llama_device(n_ctx=2048)
        _, key = await live.developer_key()
        async with live.client(key, timeout=300) as client:
            reply = await client.post(
                "/v1/chat/completions",
                json={
                    "model": MODEL,
                    "messages": [{"role": "user", "content": "Why do cats purr?"}],
                    "max_tokens": 48,  # per step
                    "temperature": 0,
                    "orchestration": {"enabled": True, "workflow": "research"},
                },
            )
            assert reply.status_code == 200, reply.text
            body = reply.json()
            run = (await client.get(f"/v1/workflows/{body['swarmgate']['workflow']['id']}")).json()
        assert body["swarmgate"]["workflow"]["status"] == "completed"
        assert body["choices"][0]["message"]["content"].strip()
        assert [s["name"] for s in run["steps"]] == ["research", "analyze", "write"]
        for step in run["steps"]:
            assert step["device_id"] == device_id and 0 < step["completion_tokens"] <= 48
        assert body["usage"]["completion_tokens"] == sum(
            s["completion_tokens"] for s in run["steps"]
        )
    finally:
        await stop_gateway(live)
