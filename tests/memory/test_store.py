"""The conversation store on SQLite and on the real PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from swarmgate.memory.store import (
    AUTO_SESSION,
    ConversationGone,
    ConversationStore,
    NewMessage,
    explicit_session,
)
from swarmgate.store.tables import accounts, conversation_messages, conversation_summaries
from tests.billing.test_ledger_race import T0, postgres_engine, sqlite_engine

OWNER, OTHER = "acct_owner", "acct_other"


@pytest.fixture(params=["sqlite", "postgresql"])
async def engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    opened = (
        sqlite_engine(tmp_path / "memory.db") if request.param == "sqlite" else postgres_engine()
    )
    async with opened as engine:
        async with engine.begin() as conn:
            await conn.execute(
                insert(accounts),
                [
                    {"id": i, "name": i, "is_developer": True, "created_at": T0}
                    for i in (OWNER, OTHER)
                ],
            )
        yield engine


def msg(role: str, content: str) -> NewMessage:
    return NewMessage(role=role, content=content, tokens=len(content.split()), counted_by="test")


async def test_messages_summaries_and_state(engine: AsyncEngine) -> None:
    store = ConversationStore(engine)
    conversation = await store.create(OWNER, key_id="key_1", system="Be brief.", now=T0)
    ids = await store.append(
        OWNER,
        conversation.id,
        [msg("user", "one"), msg("assistant", "two")],
        job_id="j1",
        model="m",
    )
    ids += await store.append(
        OWNER,
        conversation.id,
        [msg("user", "three"), msg("assistant", "four")],
        job_id="j2",
        model="m",
    )
    assert ids == sorted(ids) and len(set(ids)) == 4
    state = await store.state(OWNER, conversation.id)
    assert state is not None
    assert [m.content for m in state.unfolded] == ["one", "two", "three", "four"]
    assert state.summary is None and state.conversation.message_count == 4
    assert state.conversation.system == "Be brief." and state.conversation.model == "m"

    version = await store.save_summary(
        conversation.id,
        based_on=0,
        content="1 and 2",
        tokens=3,
        through_message_id=ids[1],
        job_id="s1",
    )
    assert version == 1
    # A second fold based on the same version loses: no lost update.
    assert (
        await store.save_summary(
            conversation.id,
            based_on=0,
            content="late",
            tokens=1,
            through_message_id=ids[3],
            job_id=None,
        )
        is None
    )
    state = await store.state(OWNER, conversation.id)
    assert state is not None and state.summary is not None
    assert state.summary.content == "1 and 2" and state.summary.version == 1
    assert [m.content for m in state.unfolded] == ["three", "four"]
    assert await store.state(OTHER, conversation.id) is None  # another account sees nothing


async def test_concurrent_appends_lose_nothing(engine: AsyncEngine) -> None:
    store = ConversationStore(engine)
    conversation = await store.create(OWNER, key_id=None)
    await asyncio.gather(
        *(
            store.append(
                OWNER,
                conversation.id,
                [msg("user", f"q{i}"), msg("assistant", f"a{i}")],
                job_id=None,
                model=None,
            )
            for i in range(20)
        )
    )
    found = await store.get(OWNER, conversation.id)
    assert found is not None and found.message_count == 40
    messages = await store.messages(conversation.id)
    assert len(messages) == 40
    # Each exchange stays together: a question is followed by its own answer.
    for question, answer in zip(messages[::2], messages[1::2], strict=True):
        assert answer.content == "a" + question.content[1:]


async def test_deleting_removes_everything_and_later_appends_fail(engine: AsyncEngine) -> None:
    store = ConversationStore(engine)
    conversation = await store.create(OWNER, key_id=None)
    ids = await store.append(OWNER, conversation.id, [msg("user", "x")], job_id=None, model=None)
    await store.save_summary(
        conversation.id, based_on=0, content="s", tokens=1, through_message_id=ids[0], job_id=None
    )
    assert not await store.delete(OTHER, conversation.id)
    assert await store.delete(OWNER, conversation.id)
    async with engine.connect() as conn:
        assert await conn.scalar(select(func.count()).select_from(conversation_messages)) == 0
        assert await conn.scalar(select(func.count()).select_from(conversation_summaries)) == 0
    with pytest.raises(ConversationGone):
        await store.append(OWNER, conversation.id, [msg("user", "y")], job_id=None, model=None)


async def test_sessions_and_retention(engine: AsyncEngine) -> None:
    store = ConversationStore(engine)
    old = await store.create(OWNER, key_id="key_1", session=AUTO_SESSION, now=T0)
    named = await store.create(OWNER, key_id="key_1", session=explicit_session("tab-1"), now=T0)
    fresh = await store.create(
        OWNER, key_id="key_1", session=AUTO_SESSION, now=T0 + timedelta(days=40)
    )
    await store.append(OWNER, old.id, [msg("user", "old")], job_id=None, model=None, now=T0)
    assert await store.session("key_1", AUTO_SESSION, active_since=None) == fresh.id
    assert await store.session("key_1", AUTO_SESSION, active_since=T0 + timedelta(days=41)) is None
    assert await store.session("key_1", explicit_session("tab-1"), active_since=None) == named.id
    assert await store.session("key_2", AUTO_SESSION, active_since=None) is None

    assert await store.delete_inactive(T0 + timedelta(days=30)) == 2
    left = await store.page(OWNER, limit=10, after=None)
    assert [c.id for c in left[0]] == [fresh.id]
    async with engine.connect() as conn:
        assert await conn.scalar(select(func.count()).select_from(conversation_messages)) == 0


async def test_pages_follow_activity(engine: AsyncEngine) -> None:
    store = ConversationStore(engine)
    made = [await store.create(OWNER, key_id=None, now=T0 + timedelta(minutes=i)) for i in range(7)]
    await store.append(
        OWNER,
        made[0].id,
        [msg("user", "bump")],
        job_id=None,
        model=None,
        now=T0 + timedelta(hours=1),
    )
    order: list[str] = []
    after = None
    while True:
        page, more = await store.page(OWNER, limit=3, after=after)
        order += [c.id for c in page]
        if not more:
            break
        after = page[-1].id
    assert order == [made[0].id] + [c.id for c in reversed(made[1:])]
    with pytest.raises(LookupError):
        await store.page(OTHER, limit=3, after=made[0].id)
