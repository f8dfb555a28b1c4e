"""Conversation memory on the request path and off it.

For a chat request with a ``conversation_id`` (or from a key with auto memory on),
``Memory.prepare`` builds the prompt from the conversation's summary, its recent
messages and the new ones (``context.build_context``), folding into the summary first
whatever no longer fits. When the answer is complete, ``Memory.commit`` stores the new
messages and the answer in one transaction, before the answer is charged and sent; a
request that fails or is cancelled stores nothing. After the commit, off the request
path, a model job titles a new conversation and, when the unfolded history has grown
past half of the window, folds its oldest part into the summary.

Title and summary jobs run like any request of the same key (``Runner``): charged at
the model's price, limited by the key's rate limits. When one cannot run, the title
falls back to the start of the first question and the oldest messages are left out of
the prompt until a later fold succeeds; the request itself never fails for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncEngine

from swarmgate.accounts.keys import Principal, utcnow
from swarmgate.catalog import Catalog
from swarmgate.config import GatewaySettings
from swarmgate.errors import (
    ContextLengthExceeded,
    ConversationNotFound,
    MemoryUnavailable,
    RequestError,
)
from swarmgate.memory import context as ctx
from swarmgate.memory.store import (
    AUTO_SESSION,
    ConversationGone,
    ConversationStore,
    NewMessage,
    State,
    StoredMessage,
    explicit_session,
)
from swarmgate.memory.tokens import ESTIMATE, TokenCounter, TokenCounters
from swarmgate.protocol import ChatMessage
from swarmgate.routing.registry import DeviceRegistry

log = logging.getLogger("swarmgate.memory")

# Runs one title or summary job for a principal: (the answer's text, the job id), or None.
Runner = Callable[[Principal, str, tuple[ChatMessage, ...], int], Awaitable[tuple[str, str] | None]]

# Texts longer than this (in characters, all together) are counted in a worker thread.
_COUNT_INLINE_CHARS = 50_000
# Rounds of folding a request may wait for before its oldest messages are left out.
_FOLD_ROUNDS = 2
MAX_SESSION_ID = 200


@dataclass(slots=True)
class MemoryTurn:
    """One request's share of a conversation: the prompt it runs and what it will store."""

    conversation_id: str
    principal: Principal
    messages: tuple[ChatMessage, ...]
    new: tuple[NewMessage, ...]
    counter: TokenCounter
    needs_title: bool
    first_question: str


class Memory:
    def __init__(
        self,
        engine: AsyncEngine,
        settings: GatewaySettings,
        catalog: Catalog,
        registry: DeviceRegistry,
        counters: TokenCounters | None = None,
    ) -> None:
        self.store = ConversationStore(engine)
        self.settings = settings
        self.catalog = catalog
        self.registry = registry
        self.counters = counters or TokenCounters()
        self.runner: Runner | None = None  # set by the API layer
        self._tasks: set[asyncio.Task[None]] = set()
        self._fold_locks: dict[str, asyncio.Lock] = {}
        self._session_locks: dict[str, asyncio.Lock] = {}
        self._sweeper: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        if self.settings.memory_retention_days > 0:
            self._sweeper = asyncio.create_task(self._sweep(), name="memory-retention")

    async def stop(self) -> None:
        tasks = list(self._tasks)
        if self._sweeper is not None:
            tasks.append(self._sweeper)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._sweeper = None

    async def settled(self) -> None:
        """Waits for every title and summary job started so far (for tests and shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # -- windows and counting ----------------------------------------------------------
    def window(self, models: Sequence[str], counter: TokenCounter) -> int:
        """The smallest context among ``models`` (what devices reported, else the
        catalog's), less a tenth when ``counter`` only estimates."""
        windows = []
        for model in models:
            reported = self.registry.context_length(model)
            entry = self.catalog.get(model)
            catalog = entry.context_length if entry is not None else None
            found = [w for w in (reported, catalog) if w is not None]
            if found:
                windows.append(min(found))
        window = min(windows) if windows else 2048
        return window - window // 10 if counter.name == ESTIMATE.name else window

    async def counter(self, model: str) -> TokenCounter:
        if self.counters.loaded(model):
            return self.counters.get(model)
        return await asyncio.to_thread(self.counters.load, model)

    @staticmethod
    async def count(counter: TokenCounter, texts: Sequence[str]) -> list[int]:
        if sum(len(text) for text in texts) <= _COUNT_INLINE_CHARS:
            return [counter.count(text) for text in texts]
        return await asyncio.to_thread(lambda: [counter.count(text) for text in texts])

    # -- the request path --------------------------------------------------------------
    async def conversation_for(
        self, principal: Principal, conversation_id: str | None, session_id: str | None
    ) -> str | None:
        """The conversation a chat request belongs to: the one it names, else (auto memory
        on the key) its session's, else None (stateless)."""
        if conversation_id is not None:
            return conversation_id
        if not principal.settings.auto_memory or principal.key_id is None:
            return None
        if session_id is not None:
            session_id = session_id.strip()
            if not session_id or len(session_id) > MAX_SESSION_ID or not session_id.isprintable():
                raise RequestError(
                    f"X-Session-ID must be 1 to {MAX_SESSION_ID} printable characters.",
                    param="X-Session-ID",
                )
        key_id = principal.key_id
        session = explicit_session(session_id) if session_id else AUTO_SESSION
        lock = self._session_locks.setdefault(f"{key_id}\x00{session}", asyncio.Lock())
        async with lock:
            active_since = None
            if session == AUTO_SESSION:
                active_since = utcnow() - timedelta(seconds=self.settings.memory_session_idle_s)
            found = await self.store.session(key_id, session, active_since=active_since)
            if found is not None:
                return found
            created = await self.store.create(principal.account_id, key_id=key_id, session=session)
            return created.id

    async def prepare(
        self,
        principal: Principal,
        conversation_id: str,
        request: Sequence[tuple[str, str]],
        *,
        models: Sequence[str],
        max_tokens: int,
    ) -> MemoryTurn:
        """The prompt for a request in ``conversation_id``; ``request`` holds its messages
        as (role, text) pairs, system ones included."""
        state = await self.store.state(principal.account_id, conversation_id, touch=utcnow())
        if state is None:
            raise ConversationNotFound(
                f"No conversation '{conversation_id}'. POST /v1/conversations creates one.",
                param="conversation_id",
            )
        systems = [text for role, text in request if role == "system"]
        others = [(role, text) for role, text in request if role != "system"]
        if not others:
            raise RequestError(
                "A request in a conversation needs at least one user or assistant message.",
                param="messages",
            )
        if len(others) > 1 and state.conversation.message_count:
            tail = await self.store.messages(conversation_id, limit=len(others) - 1)
            repeated = ctx.new_messages(others, [(m.role, m.content) for m in tail])
            others = others[repeated:]
        counter = await self.counter(models[0])
        window = self.window(models, counter)
        system = "\n\n".join(systems) if systems else state.conversation.system
        new_counts = await self.count(counter, [text for _, text in others])
        new = tuple(
            NewMessage(role=role, content=text, tokens=n, counted_by=counter.name)
            for (role, text), n in zip(others, new_counts, strict=True)
        )
        for round_ in range(_FOLD_ROUNDS + 1):
            plan = await self._plan(state, counter, system, new, window, max_tokens)
            if not plan.fold or round_ == _FOLD_ROUNDS:
                break
            folded = await self._fold(principal, state, plan.fold, models[0], window)
            if folded is None:
                break
            state = folded
        first = next((text for role, text in others if role == "user"), others[0][1])
        return MemoryTurn(
            conversation_id=conversation_id,
            principal=principal,
            messages=plan.messages,
            new=new,
            counter=counter,
            needs_title=state.conversation.title is None,
            first_question=first,
        )

    async def _plan(
        self,
        state: State,
        counter: TokenCounter,
        system: str | None,
        new: Sequence[NewMessage],
        window: int,
        max_tokens: int,
    ) -> ctx.Plan:
        history = await self._turns(state.unfolded, counter)
        summary = state.summary.content if state.summary is not None else None
        texts = [system or "", summary or ""]
        system_tokens, summary_tokens = await self.count(counter, texts)
        try:
            return ctx.build_context(
                system=system,
                system_tokens=system_tokens,
                summary=summary,
                summary_tokens=summary_tokens,
                history=history,
                new=[ctx.Counted(m.role, m.content, m.tokens) for m in new],
                window=window,
                max_tokens=max_tokens,
            )
        except ctx.ContextTooLong as exc:
            raise ContextLengthExceeded(
                f"This request needs {exc.needed} tokens with its conversation's summary and "
                f"max_tokens; the model's context holds {exc.window}. Send less text or "
                "lower max_tokens.",
                param="messages",
            ) from None

    async def _turns(
        self, messages: Sequence[StoredMessage], counter: TokenCounter
    ) -> list[ctx.Turn]:
        """Stored messages as turns counted with ``counter``; counts made with another
        tokenizer are redone (and stored again, off the request path)."""
        stale = [m for m in messages if m.counted_by != counter.name]
        if not stale:
            return [m.turn() for m in messages]
        counts = dict(
            zip(
                (m.id for m in stale),
                await self.count(counter, [m.content for m in stale]),
                strict=True,
            )
        )
        self._spawn(
            self.store.recount([(mid, n, counter.name) for mid, n in counts.items()]),
            "memory-recount",
        )
        return [ctx.Turn(m.id, m.role, m.content, counts.get(m.id, m.tokens)) for m in messages]

    async def commit(self, turn: MemoryTurn, answer: str, *, job_id: str, model: str) -> None:
        """Stores the turn's new messages and the answer together; raises (and stores
        nothing) when that cannot be done, so the caller neither charges nor answers."""
        counted = (await self.count(turn.counter, [answer]))[0]
        messages = (
            *turn.new,
            NewMessage("assistant", answer, counted, turn.counter.name),
        )
        try:
            await self.store.append(
                turn.principal.account_id,
                turn.conversation_id,
                messages,
                job_id=job_id,
                model=model,
            )
        except ConversationGone:
            raise ConversationNotFound(
                f"The conversation '{turn.conversation_id}' was deleted while this request "
                "ran; nothing was stored or charged.",
                param="conversation_id",
            ) from None
        except Exception:
            log.exception("storing a conversation's exchange failed")
            raise MemoryUnavailable(
                "The answer could not be stored in its conversation; nothing was charged. "
                "Retry the request."
            ) from None
        self._spawn(self._upkeep(turn, answer, model), "memory-upkeep")

    # -- off the request path ----------------------------------------------------------
    def _spawn(self, coro: Awaitable[object], name: str) -> None:
        async def run() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("conversation upkeep failed")

        task = asyncio.create_task(run(), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _upkeep(self, turn: MemoryTurn, answer: str, model: str) -> None:
        if turn.needs_title:
            await self._title(turn, answer, model)
        lock = self._fold_locks.setdefault(turn.conversation_id, asyncio.Lock())
        try:
            async with lock:
                state = await self.store.state(turn.principal.account_id, turn.conversation_id)
                if state is None:
                    return
                window = self.window([model], turn.counter)
                history = await self._turns(state.unfolded, turn.counter)
                due = ctx.proactive_fold(history, window)
                if due:
                    await self._fold(turn.principal, state, due, model, window)
        finally:
            if not lock.locked():
                self._fold_locks.pop(turn.conversation_id, None)

    async def _title(self, turn: MemoryTurn, answer: str, model: str) -> None:
        title, source = None, "model"
        if self.runner is not None:
            ran = await self.runner(
                turn.principal,
                model,
                ctx.title_prompt(turn.first_question, answer),
                ctx.TITLE_MAX_TOKENS,
            )
            title = ctx.clean_title(ran[0]) if ran else None
        if title is None:
            title, source = ctx.fallback_title(turn.first_question), "fallback"
        await self.store.set_title(turn.conversation_id, title, source)

    async def _fold(
        self,
        principal: Principal,
        state: State,
        turns: Sequence[ctx.Turn],
        model: str,
        window: int,
    ) -> State | None:
        """Folds ``turns`` (the oldest unfolded messages) into the summary, a version per
        chunk; the state after, or None when no chunk could be folded."""
        if self.runner is None or not turns:
            return None
        counter = await self.counter(model)
        summary = state.summary
        previous = summary.content if summary is not None else None
        previous_tokens = summary.tokens if summary is not None else 0
        version = state.conversation.summary_version
        for chunk in ctx.fold_chunks(turns, previous_tokens, window):
            ran = await self.runner(
                principal,
                model,
                ctx.fold_prompt(previous, chunk, window),
                ctx.summary_limit(window),
            )
            text = ctx.clean_summary(ran[0]) if ran else None
            if text is None:
                log.warning(
                    "a summary job gave no answer; the oldest messages stay out of the prompt",
                    extra={"conversation_id": state.conversation.id},
                )
                break
            tokens = (await self.count(counter, [text]))[0]
            saved = await self.store.save_summary(
                state.conversation.id,
                based_on=version,
                content=text,
                tokens=tokens,
                through_message_id=chunk[-1].id,
                job_id=ran[1] if ran else None,
            )
            if saved is None:  # another fold got there first
                break
            version, previous, previous_tokens = saved, text, tokens
        if version == state.conversation.summary_version:
            return None
        fresh = await self.store.state(principal.account_id, state.conversation.id)
        return fresh

    async def _sweep(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception:
                log.exception("deleting inactive conversations failed")
            await asyncio.sleep(self.settings.memory_sweep_interval_s)

    async def sweep(self) -> int:
        """Deletes conversations idle past the retention period; how many."""
        days = self.settings.memory_retention_days
        if days <= 0:
            return 0
        cutoff = utcnow() - timedelta(days=days)
        deleted = 0
        while True:
            n = await self.store.delete_inactive(cutoff)
            deleted += n
            if n < 500:
                break
        if deleted:
            log.info("deleted %d inactive conversation(s)", deleted)
        return deleted
