"""What a model sees of a stored conversation: pure functions, tested with tables.

A conversation is its stored messages (``Turn``), oldest first, and a rolling summary of
the oldest ones. A request's prompt is, in order:

1. one system message: the request's own system prompt (or the conversation's), then the
   summary of everything already folded, under a fixed header;
2. the most recent stored messages that were not folded yet, as many as fit;
3. the request's new messages.

"Fit" means the prompt, counted with the model's tokenizer (``tokens.py``), plus the
request's ``max_tokens`` stays within the model's context window. Stored messages that
do not fit are *folded*: merged into the summary by a model job (``fold_prompt``),
oldest first, in chunks that themselves fit the window. After an exchange, when the
unfolded history passes half of the window, its oldest part is folded ahead of time
(``proactive_fold``), so most requests never wait for a summary.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from swarmgate.memory.tokens import MESSAGE_OVERHEAD, PROMPT_OVERHEAD
from swarmgate.protocol import ChatMessage

SUMMARY_HEADER = "Summary of the earlier part of this conversation:"
# Unfolded history above this share of the window is folded ahead of time, down to the
# lower share.
FOLD_ABOVE = 0.5
FOLD_DOWN_TO = 0.25
# A summary job answers with at most this many tokens (and at most an eighth of the
# window), so a summary never crowds out the conversation itself.
SUMMARY_MAX_TOKENS = 512
TITLE_MAX_TOKENS = 16
TITLE_MAX_CHARS = 80


@dataclass(frozen=True, slots=True)
class Turn:
    """A stored message and its token count."""

    id: int
    role: str
    content: str
    tokens: int


@dataclass(frozen=True, slots=True)
class Counted:
    """A request's message and its token count."""

    role: str
    content: str
    tokens: int


@dataclass(frozen=True, slots=True)
class Plan:
    messages: tuple[ChatMessage, ...]
    prompt_tokens: int  # as counted, overheads included
    # Unfolded stored messages left out for lack of room, oldest first: fold them first.
    fold: tuple[Turn, ...]


class ContextTooLong(Exception):
    """The request's own messages (with the summary and max_tokens) exceed the window."""

    def __init__(self, needed: int, window: int) -> None:
        super().__init__(f"needs {needed} tokens, the context window holds {window}")
        self.needed = needed
        self.window = window


def summary_limit(window: int) -> int:
    return max(16, min(SUMMARY_MAX_TOKENS, window // 8))


def system_text(system: str | None, summary: str | None) -> str | None:
    if not summary:
        return system
    block = f"{SUMMARY_HEADER}\n{summary}"
    return f"{system}\n\n{block}" if system else block


def build_context(
    *,
    system: str | None,
    system_tokens: int,
    summary: str | None,
    summary_tokens: int,
    history: Sequence[Turn],
    new: Sequence[Counted],
    window: int,
    max_tokens: int,
) -> Plan:
    """The prompt for one request (see the module doc). ``history`` holds the unfolded
    stored messages, oldest first; ``new`` the request's messages other than system ones.

    Raises ``ContextTooLong`` when the new messages alone cannot fit."""
    head = system_text(system, summary)
    fixed = PROMPT_OVERHEAD + max_tokens + sum(m.tokens + MESSAGE_OVERHEAD for m in new)
    if head is not None:
        fixed += system_tokens + summary_tokens + MESSAGE_OVERHEAD
    if fixed > window:
        raise ContextTooLong(fixed, window)
    room = window - fixed
    cut = len(history)
    used = 0
    while cut > 0:
        cost = history[cut - 1].tokens + MESSAGE_OVERHEAD
        if used + cost > room:
            break
        used += cost
        cut -= 1
    # Start the kept history at a user message: an answer without its question reads
    # as noise. (The dropped answer is folded with its question.)
    while cut < len(history) and history[cut].role == "assistant":
        used -= history[cut].tokens + MESSAGE_OVERHEAD
        cut += 1
    messages: list[ChatMessage] = []
    if head is not None:
        messages.append(ChatMessage(role="system", content=head))
    messages.extend(ChatMessage(role=t.role, content=t.content) for t in history[cut:])  # type: ignore[arg-type]
    messages.extend(ChatMessage(role=m.role, content=m.content) for m in new)  # type: ignore[arg-type]
    return Plan(
        messages=tuple(messages), prompt_tokens=fixed - max_tokens + used, fold=tuple(history[:cut])
    )


def proactive_fold(history: Sequence[Turn], window: int) -> tuple[Turn, ...]:
    """The oldest unfolded messages to fold now, after an exchange: none while the unfolded
    history is under ``FOLD_ABOVE`` of the window; else enough that what stays is under
    ``FOLD_DOWN_TO`` of it, ending before a user message."""
    total = sum(t.tokens + MESSAGE_OVERHEAD for t in history)
    if total <= window * FOLD_ABOVE:
        return ()
    keep_at_most = window * FOLD_DOWN_TO
    cut = 0
    while cut < len(history) and total > keep_at_most:
        total -= history[cut].tokens + MESSAGE_OVERHEAD
        cut += 1
    while cut < len(history) and history[cut].role == "assistant":
        cut += 1
    return tuple(history[:cut])


def new_messages(request: Sequence[tuple[str, str]], tail: Sequence[tuple[str, str]]) -> int:
    """How many of the request's leading messages repeat the stored conversation.

    Chat front ends send the whole history with every request; API clients send only the
    new message. The request's first ``k`` messages are taken as already stored when they
    equal the last ``k`` stored ones; the largest such ``k`` is returned, leaving at least
    the request's last message as new. Both are ``(role, content)`` pairs without system
    messages.
    """
    for k in range(min(len(request) - 1, len(tail)), 0, -1):
        if list(request[:k]) == list(tail[len(tail) - k :]):
            return k
    return 0


def fold_chunks(turns: Sequence[Turn], summary_tokens: int, window: int) -> list[tuple[Turn, ...]]:
    """``turns`` split into summary jobs that each fit the window with the previous
    summary, the instructions and the new summary's room. A message too long for any
    job goes alone (``fold_prompt`` shortens it)."""
    limit = summary_limit(window)
    room = window - PROMPT_OVERHEAD - 2 * MESSAGE_OVERHEAD - _INSTRUCTION_TOKENS - limit
    room -= max(summary_tokens, limit)  # the running summary grows up to the limit
    chunks: list[tuple[Turn, ...]] = []
    current: list[Turn] = []
    used = 0
    for turn in turns:
        cost = turn.tokens + _LINE_OVERHEAD
        if current and used + cost > room:
            chunks.append(tuple(current))
            current, used = [], 0
        current.append(turn)
        used += cost
    if current:
        chunks.append(tuple(current))
    return chunks


# Worded for small models too: the instruction up front, the conversation, then the ask.
FOLD_INSTRUCTIONS = (
    "You summarise conversations. Keep every fact, name, number, preference and decision. "
    "Answer with the summary only, in short sentences."
)
_INSTRUCTION_TOKENS = 48
_LINE_OVERHEAD = 4


def fold_prompt(
    previous: str | None, chunk: Sequence[Turn], window: int
) -> tuple[ChatMessage, ...]:
    """The messages of one summary job. Text beyond what fits is cut from the middle of
    the longest messages (their start and end kept), so the job always fits."""
    limit = summary_limit(window)
    # Characters, conservatively: a token is at least one character of text.
    room = window - PROMPT_OVERHEAD - 2 * MESSAGE_OVERHEAD - _INSTRUCTION_TOKENS - 2 * limit
    lines = [f"{t.role}: {t.content}" for t in chunk]
    total = sum(t.tokens + _LINE_OVERHEAD for t in chunk)
    if total > room:
        share = max(32, room // max(1, len(chunk)))
        lines = [
            line if t.tokens <= share else _shorten(line, t.tokens, share)
            for line, t in zip(lines, chunk, strict=True)
        ]
    body = f"Summary so far:\n{previous}\n\nNew messages:\n" if previous else "Conversation:\n"
    body += "\n".join(lines)
    body += "\n\nWrite the updated summary." if previous else "\n\nWrite the summary."
    return (
        ChatMessage(role="system", content=FOLD_INSTRUCTIONS),
        ChatMessage(role="user", content=body),
    )


_PREAMBLE = re.compile(r"^(here is|here's|sure|okay|ok)\b[^\n]*\n+|^(updated )?summary:\s*", re.I)
# Where a model that continues the prompt's pattern instead of answering has gone astray.
_RUNAWAY = re.compile(
    r"^(new messages:|summary so far:|conversation:|write the |user:|assistant:)", re.I | re.M
)


def clean_summary(text: str) -> str | None:
    """A summary job's answer without preambles ("Here is the summary:") or an echo of
    the prompt's structure; None when nothing is left (the fold then counts as failed)."""
    text = text.strip()
    for _ in range(2):
        text = _PREAMBLE.sub("", text, count=1).strip()
    runaway = _RUNAWAY.search(text)
    if runaway is not None:
        text = text[: runaway.start()].strip()
    if re.fullmatch(r"(here is|here's)[^\n]*:?", text, re.I):
        return None
    return text or None


def _shorten(text: str, tokens: int, keep_tokens: int) -> str:
    keep = max(16, len(text) * keep_tokens // max(1, tokens))
    half = keep // 2
    return text[:half] + " […] " + text[len(text) - half :]


def title_prompt(question: str, answer: str) -> tuple[ChatMessage, ...]:
    return (
        ChatMessage(
            role="user",
            content="Write a title of at most six words for this conversation:\n\n"
            f"User: {question[:1000]}\nAssistant: {answer[:1000]}\n\nTitle:",
        ),
    )


def clean_title(text: str) -> str | None:
    """A model's title answer made presentable, or None when nothing usable is left."""
    line = next((part.strip() for part in text.strip().splitlines() if part.strip()), "")
    if line.lower().startswith("title:"):
        line = line[6:].strip()
    line = line.strip("\"'`*#").strip()
    if not line:
        return None
    return _clip(line)


def fallback_title(question: str) -> str:
    """The title when no model job could write one: the start of the first question."""
    words = " ".join(question.split())
    return _clip(words) if words else "New conversation"


def _clip(text: str) -> str:
    if len(text) <= TITLE_MAX_CHARS:
        return text
    cut = text[: TITLE_MAX_CHARS - 1]
    if " " in cut[20:]:
        cut = cut[: cut.rindex(" ")]
    return cut.rstrip(" ,.;:") + "…"
