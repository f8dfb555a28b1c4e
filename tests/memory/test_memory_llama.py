"""Conversation memory with a real llama.cpp device: real titles and real summaries."""

from __future__ import annotations

from pathlib import Path

import pytest

from swarmgate.memory.context import FOLD_INSTRUCTIONS, SUMMARY_HEADER
from tests.conftest import MODEL, fast_settings, start_gateway, stop_gateway
from tests.memory.test_memory_chat import Prompts

QUESTIONS = [
    "My name is Ada and I keep three goats called Pip, Mo and Lu.",
    "Suggest a breakfast for a busy morning.",
    "Name a good book about the sea.",
    "What should I plant in a small garden?",
    "Give me a tip for sleeping better.",
    "How do I keep goats healthy in winter?",
    "What are my goats called?",
]


@pytest.mark.llama
async def test_a_real_model_titles_and_summarises_a_conversation(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    # Patient timeouts: a real model on a busy 2-core box.
    live = await start_gateway(
        fast_settings(tmp_path, first_token_timeout_s=60.0, token_stall_timeout_s=60.0)
    )
    try:
        # A 512-token context: a few exchanges fill half of it and start the folding.
        _, agent = await live.add_llama_device(n_ctx=512)
        assert live.gateway.registry.context_length(MODEL) == 512
        prompts = Prompts(agent)
        _, key = await live.developer_key()
        async with live.client(key, timeout=180) as client:
            conversation_id = (await client.post("/v1/conversations", json={})).json()["id"]
            for question in QUESTIONS:
                response = await client.post(
                    "/v1/chat/completions",
                    json={
                        "model": MODEL,
                        "conversation_id": conversation_id,
                        "messages": [{"role": "user", "content": question}],
                        "max_tokens": 48,
                        "temperature": 0,
                    },
                )
                assert response.status_code == 200, response.text
                await live.gateway.memory.settled()
            got = (await client.get(f"/v1/conversations/{conversation_id}")).json()
        assert got["message_count"] == 2 * len(QUESTIONS)
        assert got["title"]  # written by the model or, failing that, the fallback
        assert got["summary_version"] >= 1
        summary = got["summary"]["content"]
        assert summary.strip()
        # The first fold saw the first message; the last question's prompt opens with the
        # summary, and the first message itself is no longer in it.
        folds = [p for p in prompts.seen if p[0] == ("system", FOLD_INSTRUCTIONS)]
        assert "Pip, Mo and Lu" in folds[0][-1][1]
        last = next(p for p in reversed(prompts.seen) if p[-1][1] == QUESTIONS[-1])
        assert last[0][0] == "system" and SUMMARY_HEADER in last[0][1]
        assert all(QUESTIONS[0] != content for _, content in last)
    finally:
        await stop_gateway(live)
