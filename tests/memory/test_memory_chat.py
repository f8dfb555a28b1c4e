"""Chat completions with conversation memory, over real sockets with ``sim`` devices."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import func, select, update

from swarmgate.accounts import service
from swarmgate.accounts.keys import utcnow
from swarmgate.billing.ledger import developer_book
from swarmgate.logs import PAYLOAD_LOGGERS
from swarmgate.memory.context import FOLD_INSTRUCTIONS, SUMMARY_HEADER
from swarmgate.store.tables import (
    api_keys,
    charges,
    conversation_messages,
    conversation_summaries,
    conversations,
)
from tests.billing.test_request_billing import books, priced_catalog
from tests.conftest import MODEL, LiveGateway, fast_settings, start_gateway, stop_gateway


@pytest.fixture
async def priced(tmp_path: Path) -> AsyncIterator[LiveGateway]:
    live = await start_gateway(fast_settings(tmp_path, catalog_path=priced_catalog(tmp_path)))
    try:
        yield live
    finally:
        await stop_gateway(live)


async def developer(live: LiveGateway, **key_settings: Any) -> tuple[str, str, str]:
    account = await service.create_account(live.gateway.engine, name="dev", credit_micros=5_000_000)
    key = await service.create_api_key(live.gateway.engine, account_id=account["id"])
    if key_settings:
        async with live.gateway.engine.begin() as conn:
            await conn.execute(
                update(api_keys).where(api_keys.c.id == key.id).values(**key_settings)
            )
    return account["id"], key.id, key.secret


async def new_conversation(client: httpx.AsyncClient, **body: Any) -> str:
    response = await client.post("/v1/conversations", json=body)
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def ask(content: str, conversation_id: str | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 16,
        **extra,
    }
    if conversation_id is not None:
        body["conversation_id"] = conversation_id
    return body


async def stored(live: LiveGateway, conversation_id: str) -> list[tuple[str, str]]:
    async with live.gateway.engine.connect() as conn:
        rows = (
            await conn.execute(
                select(conversation_messages.c.role, conversation_messages.c.content)
                .where(conversation_messages.c.conversation_id == conversation_id)
                .order_by(conversation_messages.c.id)
            )
        ).all()
    return [(r.role, r.content) for r in rows]


class Prompts:
    """Records the prompts a sim device receives (wraps its backend's generate)."""

    def __init__(self, agent: Any) -> None:
        self.seen: list[list[tuple[str, str]]] = []
        backend = agent.backend
        original = backend.generate

        def generate(request: Any) -> Any:
            self.seen.append([(m.role, m.content) for m in request.messages])
            return original(request)

        backend.generate = generate


async def test_a_conversation_remembers_earlier_turns(live: LiveGateway) -> None:
    agent = await live.add_sim_device()
    prompts = Prompts(agent)
    _, key = await live.developer_key()
    async with live.client(key) as client:
        conversation_id = await new_conversation(client)
        first = await client.post(
            "/v1/chat/completions", json=ask("My name is Ada.", conversation_id)
        )
        assert first.status_code == 200, first.text
        assert first.headers["x-conversation-id"] == conversation_id
        assert first.json()["swarmgate"]["conversation_id"] == conversation_id
        answer = first.json()["choices"][0]["message"]["content"]
        await live.gateway.memory.settled()
        second = await client.post(
            "/v1/chat/completions", json=ask("What is my name?", conversation_id)
        )
        assert second.status_code == 200, second.text
        await live.gateway.memory.settled()
    # The device saw the earlier exchange before the new question.
    last = [p for p in prompts.seen if p[-1] == ("user", "What is my name?")][-1]
    assert last == [
        ("user", "My name is Ada."),
        ("assistant", answer),
        ("user", "What is my name?"),
    ]
    messages = await stored(live, conversation_id)
    assert messages[:3] == [
        ("user", "My name is Ada."),
        ("assistant", answer),
        ("user", "What is my name?"),
    ]
    assert len(messages) == 4


async def test_streamed_answers_are_stored_whole(live: LiveGateway) -> None:
    await live.add_sim_device()
    _, key = await live.developer_key()
    async with live.client(key) as client:
        conversation_id = await new_conversation(client)
        text = ""
        async with client.stream(
            "POST", "/v1/chat/completions", json=ask("Stream to me", conversation_id, stream=True)
        ) as response:
            assert response.status_code == 200
            assert response.headers["x-conversation-id"] == conversation_id
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    chunk = orjson.loads(line[6:])
                    for choice in chunk["choices"]:
                        text += choice["delta"].get("content") or ""
    assert text
    assert await stored(live, conversation_id) == [("user", "Stream to me"), ("assistant", text)]


async def test_the_openai_sdk_uses_memory_through_extra_body(live: LiveGateway) -> None:
    await live.add_sim_device()
    _, key = await live.developer_key()
    sdk = live.sdk(key)
    async with live.client(key) as client:
        conversation_id = await new_conversation(client, title="Trip planning")
    done = await sdk.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Plan a trip"}],
        max_tokens=8,
        extra_body={"conversation_id": conversation_id},
    )
    assert done.choices[0].message.content
    assert len(await stored(live, conversation_id)) == 2
    await live.gateway.memory.settled()
    async with live.client(key) as client:
        got = (await client.get(f"/v1/conversations/{conversation_id}")).json()
    assert got["title"] == "Trip planning"  # a title given by the user is kept


async def test_a_failed_request_stores_nothing_and_is_not_charged(priced: LiveGateway) -> None:
    live = priced
    await live.add_sim_device(fail_rate=1.0)
    account_id, _, key = await developer(live)
    before = await books(live, developer_book(account_id))
    async with live.client(key) as client:
        conversation_id = await new_conversation(client)
        response = await client.post("/v1/chat/completions", json=ask("Fail me", conversation_id))
        assert response.status_code >= 500
        streamed = await client.post(
            "/v1/chat/completions", json=ask("Fail me too", conversation_id, stream=True)
        )
        assert streamed.status_code >= 500
    await live.gateway.memory.settled()
    assert await stored(live, conversation_id) == []
    assert await books(live, developer_book(account_id)) == before
    async with live.gateway.engine.connect() as conn:
        assert await conn.scalar(select(func.count()).select_from(charges)) == 0
        count = await conn.scalar(
            select(conversations.c.message_count).where(conversations.c.id == conversation_id)
        )
    assert count == 0


async def test_a_stream_cut_mid_answer_stores_nothing(priced: LiveGateway) -> None:
    live = priced
    await live.add_sim_device(error_after_tokens=3, length=24)
    _, _, key = await developer(live)
    async with live.client(key) as client:
        conversation_id = await new_conversation(client)
        async with client.stream(
            "POST",
            "/v1/chat/completions",
            json=ask("Break", conversation_id, stream=True, stream_continuation=False),
        ) as response:
            body = b"".join([chunk async for chunk in response.aiter_bytes()])
    assert b'"error"' in body
    assert await stored(live, conversation_id) == []
    async with live.gateway.engine.connect() as conn:
        assert await conn.scalar(select(func.count()).select_from(charges)) == 0


async def test_a_client_leaving_mid_stream_stores_nothing(priced: LiveGateway) -> None:
    live = priced
    await live.add_sim_device(tokens_per_s=20, length=40)
    _, _, key = await developer(live)
    async with live.client(key) as client:
        conversation_id = await new_conversation(client)
        async with client.stream(
            "POST",
            "/v1/chat/completions",
            json=ask("Leave", conversation_id, stream=True, max_tokens=40),
        ) as response:
            async for _line in response.aiter_lines():
                break  # the client goes away after the first chunk
    await asyncio.sleep(0.5)
    await live.gateway.memory.settled()
    assert await stored(live, conversation_id) == []
    async with live.gateway.engine.connect() as conn:
        assert await conn.scalar(select(func.count()).select_from(charges)) == 0


async def test_the_exchange_and_its_charge_go_together(priced: LiveGateway) -> None:
    live = priced
    await live.add_sim_device()
    _, _, key = await developer(live)
    async with live.client(key) as client:
        conversation_id = await new_conversation(client, title="t")
        ok = await client.post("/v1/chat/completions", json=ask("Charge me", conversation_id))
        assert ok.status_code == 200
    await live.gateway.memory.settled()
    async with live.gateway.engine.connect() as conn:
        jobs = (
            await conn.execute(
                select(conversation_messages.c.job_id).where(
                    conversation_messages.c.conversation_id == conversation_id
                )
            )
        ).all()
    assert {j.job_id for j in jobs} == {ok.json()["id"]}
    await live.gateway.billing.writer.posted()
    async with live.gateway.engine.connect() as conn:
        charged = (await conn.execute(select(charges.c.job_id))).all()
    assert ok.json()["id"] in {c.job_id for c in charged}


async def test_titles_come_from_a_model_job_or_fall_back(live: LiveGateway) -> None:
    await live.add_sim_device()
    _, key = await live.developer_key()
    async with live.client(key) as client:
        conversation_id = await new_conversation(client)
        await client.post("/v1/chat/completions", json=ask("Tell me about otters", conversation_id))
        await live.gateway.memory.settled()
        got = (await client.get(f"/v1/conversations/{conversation_id}")).json()
    assert got["title"]
    async with live.gateway.engine.connect() as conn:
        source = await conn.scalar(
            select(conversations.c.title_source).where(conversations.c.id == conversation_id)
        )
    assert source == "model"
    # The title job is a request of its own: charged, recorded, not stored in the chat.
    assert len(got["messages"]) == 2

    # With no device able to run the title job, the first question names it.
    async def failing(*_args: Any) -> None:
        return None

    live.gateway.memory.runner = failing
    async with live.client(key) as client:
        other = await new_conversation(client)
        await client.post(
            "/v1/chat/completions", json=ask("  How do   otters sleep at night?", other)
        )
        await live.gateway.memory.settled()
        got = (await client.get(f"/v1/conversations/{other}")).json()
    assert got["title"] == "How do otters sleep at night?"


async def test_auto_memory_splits_sessions_after_inactivity(live: LiveGateway) -> None:
    agent = await live.add_sim_device()
    prompts = Prompts(agent)
    _, _, key = await developer(live, auto_memory=True)
    async with live.client(key) as client:
        # A chat front end sends the whole history every time.
        first = await client.post("/v1/chat/completions", json=ask("Hello there"))
        conversation_id = first.headers["x-conversation-id"]
        answer = first.json()["choices"][0]["message"]["content"]
        history = {
            "model": MODEL,
            "max_tokens": 16,
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hello there"},
                {"role": "assistant", "content": answer},
                {"role": "user", "content": "And again"},
            ],
        }
        second = await client.post("/v1/chat/completions", json=history)
        assert second.headers["x-conversation-id"] == conversation_id
        # The repeated history is recognised, not stored twice.
        assert [m for m in await stored(live, conversation_id)][:3] == [
            ("user", "Hello there"),
            ("assistant", answer),
            ("user", "And again"),
        ]
        assert len(await stored(live, conversation_id)) == 4
        again = next(p for p in prompts.seen if p[-1] == ("user", "And again"))
        assert again[0] == ("system", "Be brief.")
        assert again[1:] == [
            ("user", "Hello there"),
            ("assistant", answer),
            ("user", "And again"),
        ]
        # 31 minutes of silence: the next request starts a new conversation.
        async with live.gateway.engine.begin() as conn:
            await conn.execute(
                update(conversations)
                .where(conversations.c.id == conversation_id)
                .values(last_activity_at=utcnow() - timedelta(minutes=31))
            )
        third = await client.post("/v1/chat/completions", json=ask("New topic"))
        assert third.headers["x-conversation-id"] != conversation_id
        listed = (await client.get("/v1/conversations")).json()
    assert len(listed["data"]) == 2
    await live.gateway.memory.settled()


async def test_x_session_id_names_the_session(live: LiveGateway) -> None:
    await live.add_sim_device()
    _, _, key = await developer(live, auto_memory=True)
    async with live.client(key) as client:
        a1 = await client.post(
            "/v1/chat/completions", json=ask("in a"), headers={"X-Session-ID": "a"}
        )
        b1 = await client.post(
            "/v1/chat/completions", json=ask("in b"), headers={"X-Session-ID": "b"}
        )
        a2 = await client.post(
            "/v1/chat/completions", json=ask("a again"), headers={"X-Session-ID": "a"}
        )
        bad = await client.post(
            "/v1/chat/completions", json=ask("x"), headers={"X-Session-ID": "x" * 201}
        )
    a, b = a1.headers["x-conversation-id"], b1.headers["x-conversation-id"]
    assert a != b and a2.headers["x-conversation-id"] == a
    assert [m for m, _ in await stored(live, a)] == ["user", "assistant", "user", "assistant"]
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "X-Session-ID"
    await live.gateway.memory.settled()


async def test_without_memory_the_api_stays_stateless(live: LiveGateway) -> None:
    await live.add_sim_device()
    _, key = await live.developer_key()
    async with live.client(key) as client:
        response = await client.post("/v1/chat/completions", json=ask("Nothing kept"))
        assert response.status_code == 200
        assert "x-conversation-id" not in response.headers
        assert "conversation_id" not in response.json()["swarmgate"]
    async with live.gateway.engine.connect() as conn:
        assert await conn.scalar(select(func.count()).select_from(conversations)) == 0
        assert await conn.scalar(select(func.count()).select_from(conversation_messages)) == 0


async def test_unknown_or_foreign_conversations_are_404(live: LiveGateway) -> None:
    await live.add_sim_device()
    _, key = await live.developer_key("a")
    _, other_key = await live.developer_key("b")
    async with live.client(key) as client:
        conversation_id = await new_conversation(client)
    async with live.client(other_key) as client:
        for body in (ask("hi", conversation_id), ask("hi", "conv_nope")):
            response = await client.post("/v1/chat/completions", json=body)
            assert response.status_code == 404
            assert response.json()["error"]["code"] == "CONVERSATION_NOT_FOUND"
            assert response.json()["error"]["param"] == "conversation_id"
        wrong_type = await client.post(
            "/v1/chat/completions", json={**ask("hi"), "conversation_id": 12}
        )
        assert wrong_type.status_code == 400
        assert wrong_type.json()["error"]["param"] == "conversation_id"


async def test_a_request_too_long_for_the_window_is_a_clear_400(tmp_path: Path) -> None:
    live = await start_gateway(fast_settings(tmp_path))
    try:
        await live.add_sim_device(context_length=400)
        _, key = await live.developer_key()
        async with live.client(key) as client:
            conversation_id = await new_conversation(client)
            response = await client.post(
                "/v1/chat/completions", json=ask("word " * 600, conversation_id, max_tokens=16)
            )
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "CONTEXT_LENGTH_EXCEEDED"
        assert await stored(live, conversation_id) == []
    finally:
        await stop_gateway(live)


async def test_200_turns_never_overflow_and_summaries_carry_the_start(tmp_path: Path) -> None:
    """A small window (600 tokens, enforced by the sim device) and 200 turns: every request
    fits, older turns are folded into versioned summaries, and the first message's words
    reach later prompts through the summary."""
    live = await start_gateway(fast_settings(tmp_path))
    try:
        agent = await live.add_sim_device(context_length=600, length=12, slots=2)
        prompts = Prompts(agent)
        _, key = await live.developer_key()
        async with live.client(key) as client:
            conversation_id = await new_conversation(client, system="You are terse.")
            for turn in range(200):
                text = f"Turn {turn}: remember the code word zebra{turn % 7}."
                if turn == 0:
                    text += " The secret is PELICAN."
                response = await client.post(
                    "/v1/chat/completions", json=ask(text, conversation_id, max_tokens=12)
                )
                assert response.status_code == 200, (turn, response.text)
                await live.gateway.memory.settled()
            got = (await client.get(f"/v1/conversations/{conversation_id}")).json()
        assert got["message_count"] == 400
        assert got["summary_version"] >= 5
        assert got["summary"]["version"] == got["summary_version"]
        chats = [
            p for p in prompts.seen if p and p[-1][0] == "user" and p[-1][1].startswith("Turn")
        ]
        assert len(chats) == 200
        # Late prompts start with the system prompt and the summary, then recent turns.
        late = chats[-1]
        assert late[0][0] == "system" and late[0][1].startswith("You are terse.")
        assert SUMMARY_HEADER in late[0][1]
        assert len(late) < 60
        async with live.gateway.engine.connect() as conn:
            versions = (
                await conn.execute(
                    select(conversation_summaries.c.version)
                    .where(conversation_summaries.c.conversation_id == conversation_id)
                    .order_by(conversation_summaries.c.version)
                )
            ).all()
        assert [v.version for v in versions] == list(range(1, len(versions) + 1))
        # Summary jobs saw the first message (the sim cannot summarise, but the job's
        # input proves what was folded, in order).
        folds = [p for p in prompts.seen if p[0] == ("system", FOLD_INSTRUCTIONS)]
        assert folds and "PELICAN" in folds[0][-1][1]
    finally:
        await stop_gateway(live)


async def test_retention_deletes_only_idle_conversations(live: LiveGateway) -> None:
    await live.add_sim_device()
    _, key = await live.developer_key()
    async with live.client(key) as client:
        old = await new_conversation(client)
        fresh = await new_conversation(client)
        for conversation_id in (old, fresh):
            await client.post("/v1/chat/completions", json=ask("keep?", conversation_id))
        await live.gateway.memory.settled()
    async with live.gateway.engine.begin() as conn:
        await conn.execute(
            update(conversations)
            .where(conversations.c.id == old)
            .values(last_activity_at=utcnow() - timedelta(days=31))
        )
    assert await live.gateway.memory.sweep() == 1
    async with live.gateway.engine.connect() as conn:
        left = (await conn.execute(select(conversations.c.id))).all()
        orphans = await conn.scalar(
            select(func.count())
            .select_from(conversation_messages)
            .where(conversation_messages.c.conversation_id == old)
        )
    assert [r.id for r in left] == [fresh]
    assert orphans == 0
    assert await stored(live, fresh)


async def test_no_conversation_text_reaches_the_logs(
    live: LiveGateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for name in PAYLOAD_LOGGERS:  # as configure_logging leaves them
        caplog.set_level(logging.WARNING, logger=name)
    await live.add_sim_device()
    _, key = await live.developer_key()
    marker = "quokka-marker-7f3e"
    async with live.client(key) as client:
        conversation_id = await new_conversation(client, system=f"sys {marker}")
        await client.post("/v1/chat/completions", json=ask(f"hello {marker}", conversation_id))
        await client.post(
            f"/v1/conversations/{conversation_id}/messages",
            json={"role": "user", "content": f"note {marker}"},
        )
        await live.gateway.memory.settled()
    assert marker not in caplog.text
