"""Conversations in the database: rows in, rows out, every write one transaction."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, delete, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from swarmgate.accounts.keys import new_id, utcnow
from swarmgate.memory.context import Turn
from swarmgate.store.db import as_utc, iso, write_transaction
from swarmgate.store.tables import conversation_messages, conversation_summaries, conversations

AUTO_SESSION = "auto"


def explicit_session(session_id: str) -> str:
    return f"x:{session_id}"


@dataclass(frozen=True, slots=True)
class Conversation:
    id: str
    account_id: str
    key_id: str | None
    session: str | None
    title: str | None
    title_source: str | None
    system: str | None
    model: str | None
    message_count: int
    summary_version: int
    summarized_through: int
    created_at: datetime
    last_activity_at: datetime

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "conversation",
            "title": self.title,
            "message_count": self.message_count,
            "model": self.model,
            "system": self.system,
            "session": _public_session(self.session),
            "summary_version": self.summary_version,
            "created_at": iso(self.created_at),
            "last_activity_at": iso(self.last_activity_at),
        }


def _public_session(session: str | None) -> dict[str, Any] | None:
    if session is None:
        return None
    if session == AUTO_SESSION:
        return {"type": "inactivity"}
    return {"type": "header", "id": session[2:]}


@dataclass(frozen=True, slots=True)
class StoredMessage:
    id: int
    role: str
    content: str
    tokens: int
    counted_by: str
    created_at: datetime

    def turn(self) -> Turn:
        return Turn(id=self.id, role=self.role, content=self.content, tokens=self.tokens)

    def describe(self) -> dict[str, Any]:
        return {
            "id": f"msg_{self.id}",
            "object": "conversation.message",
            "role": self.role,
            "content": self.content,
            "created_at": iso(self.created_at),
        }


@dataclass(frozen=True, slots=True)
class Summary:
    version: int
    content: str
    tokens: int
    through_message_id: int
    job_id: str | None
    created_at: datetime

    def describe(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "content": self.content,
            "through_message_id": f"msg_{self.through_message_id}",
            "created_at": iso(self.created_at),
        }


@dataclass(frozen=True, slots=True)
class NewMessage:
    role: str
    content: str
    tokens: int
    counted_by: str


@dataclass(frozen=True, slots=True)
class State:
    """What building a prompt needs: the conversation, its current summary and the
    messages not folded into it yet, oldest first."""

    conversation: Conversation
    summary: Summary | None
    unfolded: tuple[StoredMessage, ...]


class ConversationGone(Exception):
    """The conversation was deleted (by its owner, or for inactivity) meanwhile."""


def _conversation(row: Any) -> Conversation:
    return Conversation(
        id=row.id,
        account_id=row.account_id,
        key_id=row.key_id,
        session=row.session,
        title=row.title,
        title_source=row.title_source,
        system=row.system,
        model=row.model,
        message_count=int(row.message_count),
        summary_version=int(row.summary_version),
        summarized_through=int(row.summarized_through),
        created_at=as_utc(row.created_at),
        last_activity_at=as_utc(row.last_activity_at),
    )


def _message(row: Any) -> StoredMessage:
    return StoredMessage(
        id=int(row.id),
        role=row.role,
        content=row.content,
        tokens=int(row.tokens),
        counted_by=row.counted_by,
        created_at=as_utc(row.created_at),
    )


def _summary(row: Any) -> Summary:
    return Summary(
        version=int(row.version),
        content=row.content,
        tokens=int(row.tokens),
        through_message_id=int(row.through_message_id),
        job_id=row.job_id,
        created_at=as_utc(row.created_at),
    )


class ConversationStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def create(
        self,
        account_id: str,
        *,
        key_id: str | None,
        title: str | None = None,
        system: str | None = None,
        model: str | None = None,
        session: str | None = None,
        now: datetime | None = None,
    ) -> Conversation:
        now = now or utcnow()
        row = {
            "id": new_id("conv"),
            "account_id": account_id,
            "key_id": key_id,
            "session": session,
            "title": title,
            "title_source": "user" if title else None,
            "system": system,
            "model": model,
            "message_count": 0,
            "summary_version": 0,
            "summarized_through": 0,
            "created_at": now,
            "last_activity_at": now,
        }
        async with write_transaction(self._engine) as conn:
            await conn.execute(insert(conversations).values(**row))
        return _conversation(_Row(row))

    async def get(self, account_id: str, conversation_id: str) -> Conversation | None:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    select(conversations).where(
                        conversations.c.id == conversation_id,
                        conversations.c.account_id == account_id,
                    )
                )
            ).first()
        return _conversation(row) if row is not None else None

    async def page(
        self, account_id: str, *, limit: int, after: str | None
    ) -> tuple[list[Conversation], bool]:
        """Newest activity first; ``after`` is the last id of the previous page."""
        query = select(conversations).where(conversations.c.account_id == account_id)
        async with self._engine.connect() as conn:
            if after is not None:
                cursor = (
                    await conn.execute(
                        select(conversations.c.last_activity_at).where(
                            conversations.c.id == after, conversations.c.account_id == account_id
                        )
                    )
                ).first()
                if cursor is None:
                    raise LookupError(after)
                at = cursor.last_activity_at
                query = query.where(
                    or_(
                        conversations.c.last_activity_at < at,
                        and_(conversations.c.last_activity_at == at, conversations.c.id < after),
                    )
                )
            rows = (
                await conn.execute(
                    query.order_by(
                        conversations.c.last_activity_at.desc(), conversations.c.id.desc()
                    ).limit(limit + 1)
                )
            ).all()
        found = [_conversation(row) for row in rows]
        return found[:limit], len(found) > limit

    async def messages(
        self, conversation_id: str, *, limit: int | None = None
    ) -> list[StoredMessage]:
        """Oldest first; with ``limit``, the newest ``limit`` only."""
        query = select(conversation_messages).where(
            conversation_messages.c.conversation_id == conversation_id
        )
        async with self._engine.connect() as conn:
            if limit is None:
                rows = (await conn.execute(query.order_by(conversation_messages.c.id))).all()
            else:
                rows = list(
                    reversed(
                        (
                            await conn.execute(
                                query.order_by(conversation_messages.c.id.desc()).limit(limit)
                            )
                        ).all()
                    )
                )
        return [_message(row) for row in rows]

    async def summary(self, conversation: Conversation) -> Summary | None:
        if conversation.summary_version == 0:
            return None
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    select(conversation_summaries).where(
                        conversation_summaries.c.conversation_id == conversation.id,
                        conversation_summaries.c.version == conversation.summary_version,
                    )
                )
            ).first()
        return _summary(row) if row is not None else None

    async def state(
        self, account_id: str, conversation_id: str, *, touch: datetime | None = None
    ) -> State | None:
        """The conversation, its summary and its unfolded messages, read in one
        transaction; with ``touch``, its last activity is set first, so that a retention
        sweep leaves a conversation in use alone."""
        async with write_transaction(self._engine) as conn:
            if touch is not None:
                await conn.execute(
                    update(conversations)
                    .where(
                        conversations.c.id == conversation_id,
                        conversations.c.account_id == account_id,
                    )
                    .values(last_activity_at=touch)
                )
            row = (
                await conn.execute(
                    select(conversations).where(
                        conversations.c.id == conversation_id,
                        conversations.c.account_id == account_id,
                    )
                )
            ).first()
            if row is None:
                return None
            conversation = _conversation(row)
            summary = None
            if conversation.summary_version:
                found = (
                    await conn.execute(
                        select(conversation_summaries).where(
                            conversation_summaries.c.conversation_id == conversation.id,
                            conversation_summaries.c.version == conversation.summary_version,
                        )
                    )
                ).first()
                summary = _summary(found) if found is not None else None
            rows = (
                await conn.execute(
                    select(conversation_messages)
                    .where(
                        conversation_messages.c.conversation_id == conversation.id,
                        conversation_messages.c.id > conversation.summarized_through,
                    )
                    .order_by(conversation_messages.c.id)
                )
            ).all()
        return State(conversation, summary, tuple(_message(r) for r in rows))

    async def append(
        self,
        account_id: str,
        conversation_id: str,
        messages: Sequence[NewMessage],
        *,
        job_id: str | None,
        model: str | None,
        now: datetime | None = None,
    ) -> list[int]:
        """Stores messages in one transaction; their ids, in order. Raises
        ``ConversationGone`` when the conversation no longer exists."""
        now = now or utcnow()
        values: dict[str, Any] = {
            "message_count": conversations.c.message_count + len(messages),
            "last_activity_at": now,
        }
        if model is not None:
            values["model"] = model
        async with write_transaction(self._engine) as conn:
            result = await conn.execute(
                update(conversations)
                .where(
                    conversations.c.id == conversation_id,
                    conversations.c.account_id == account_id,
                )
                .values(**values)
            )
            if result.rowcount == 0:
                raise ConversationGone(conversation_id)
            ids = []
            for message in messages:
                inserted = await conn.execute(
                    insert(conversation_messages).values(
                        conversation_id=conversation_id,
                        role=message.role,
                        content=message.content,
                        tokens=message.tokens,
                        counted_by=message.counted_by,
                        job_id=job_id,
                        created_at=now,
                    )
                )
                key = inserted.inserted_primary_key
                assert key is not None
                ids.append(int(key[0]))
        return ids

    async def recount(self, updates: Sequence[tuple[int, int, str]]) -> None:
        """Stores token counts made with another tokenizer: (message id, tokens, counter)."""
        if not updates:
            return
        async with write_transaction(self._engine) as conn:
            for message_id, tokens, counted_by in updates:
                await conn.execute(
                    update(conversation_messages)
                    .where(conversation_messages.c.id == message_id)
                    .values(tokens=tokens, counted_by=counted_by)
                )

    async def save_summary(
        self,
        conversation_id: str,
        *,
        based_on: int,
        content: str,
        tokens: int,
        through_message_id: int,
        job_id: str | None,
        now: datetime | None = None,
    ) -> int | None:
        """Adds the next summary version if the current one is still ``based_on`` (another
        fold may have won meanwhile); the new version, or None."""
        now = now or utcnow()
        version = based_on + 1
        async with write_transaction(self._engine) as conn:
            result = await conn.execute(
                update(conversations)
                .where(
                    conversations.c.id == conversation_id,
                    conversations.c.summary_version == based_on,
                )
                .values(summary_version=version, summarized_through=through_message_id)
            )
            if result.rowcount == 0:
                return None
            await conn.execute(
                insert(conversation_summaries).values(
                    conversation_id=conversation_id,
                    version=version,
                    content=content,
                    tokens=tokens,
                    through_message_id=through_message_id,
                    job_id=job_id,
                    created_at=now,
                )
            )
        return version

    async def set_title(self, conversation_id: str, title: str, source: str) -> bool:
        """Sets a generated title unless the conversation already has one."""
        async with write_transaction(self._engine) as conn:
            result = await conn.execute(
                update(conversations)
                .where(conversations.c.id == conversation_id, conversations.c.title.is_(None))
                .values(title=title, title_source=source)
            )
        return bool(result.rowcount)

    async def update(
        self, account_id: str, conversation_id: str, values: dict[str, Any]
    ) -> Conversation | None:
        async with write_transaction(self._engine) as conn:
            result = await conn.execute(
                update(conversations)
                .where(
                    conversations.c.id == conversation_id,
                    conversations.c.account_id == account_id,
                )
                .values(**values)
            )
            if result.rowcount == 0:
                return None
        return await self.get(account_id, conversation_id)

    async def delete(self, account_id: str, conversation_id: str) -> bool:
        async with write_transaction(self._engine) as conn:
            found = (
                await conn.execute(
                    select(conversations.c.id).where(
                        conversations.c.id == conversation_id,
                        conversations.c.account_id == account_id,
                    )
                )
            ).first()
            if found is None:
                return False
            await _delete_ids(conn, [conversation_id])
        return True

    async def session(
        self, key_id: str, session: str, *, active_since: datetime | None
    ) -> str | None:
        """The key's latest conversation of this session (active since ``active_since``
        when given)."""
        query = select(conversations.c.id).where(
            conversations.c.key_id == key_id, conversations.c.session == session
        )
        if active_since is not None:
            query = query.where(conversations.c.last_activity_at >= active_since)
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(query.order_by(conversations.c.last_activity_at.desc()).limit(1))
            ).first()
        return row.id if row is not None else None

    async def delete_inactive(self, before: datetime, *, limit: int = 500) -> int:
        """Deletes up to ``limit`` conversations idle since before ``before``, with their
        messages and summaries. The rows are locked as they are chosen (and SQLite holds
        its write lock for the whole transaction), so a request that touches one
        meanwhile waits and then finds it gone, rather than writing into it half-deleted."""
        async with write_transaction(self._engine) as conn:
            rows = (
                await conn.execute(
                    select(conversations.c.id)
                    .where(conversations.c.last_activity_at < before)
                    .limit(limit)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            ids = [row.id for row in rows]
            if ids:
                await _delete_ids(conn, ids)
        return len(ids)

    async def count(self, account_id: str) -> int:
        async with self._engine.connect() as conn:
            found = await conn.scalar(
                select(func.count())
                .select_from(conversations)
                .where(conversations.c.account_id == account_id)
            )
        return int(found or 0)


async def _delete_ids(conn: Any, ids: list[str]) -> None:
    # Children first, explicitly: no reliance on the database enforcing ON DELETE CASCADE.
    await conn.execute(
        delete(conversation_messages).where(conversation_messages.c.conversation_id.in_(ids))
    )
    await conn.execute(
        delete(conversation_summaries).where(conversation_summaries.c.conversation_id.in_(ids))
    )
    await conn.execute(delete(conversations).where(conversations.c.id.in_(ids)))


class _Row:
    """A dict read like a result row."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)
