"""Context building, summary windows and titles: pure functions, tested with tables."""

from __future__ import annotations

import pytest

from swarmgate.memory.context import (
    SUMMARY_HEADER,
    ContextTooLong,
    Counted,
    Turn,
    build_context,
    clean_summary,
    clean_title,
    fallback_title,
    fold_chunks,
    fold_prompt,
    new_messages,
    proactive_fold,
    summary_limit,
    system_text,
)
from swarmgate.memory.tokens import MESSAGE_OVERHEAD, PROMPT_OVERHEAD, estimate_tokens


def turns(*sizes: int) -> list[Turn]:
    """Alternating user/assistant turns with the given token counts, ids from 1."""
    return [
        Turn(id=i + 1, role="user" if i % 2 == 0 else "assistant", content=f"m{i + 1}", tokens=n)
        for i, n in enumerate(sizes)
    ]


def plan(
    history: list[Turn],
    *,
    window: int,
    max_tokens: int = 10,
    new_tokens: int = 10,
    system: str | None = None,
    summary: str | None = None,
    extra: int = 0,
) -> tuple[list[int], list[int], int]:
    """(kept history ids, folded ids, prompt tokens)."""
    result = build_context(
        system=system,
        system_tokens=extra if system else 0,
        summary=summary,
        summary_tokens=extra if summary else 0,
        history=history,
        new=[Counted("user", "new", new_tokens)],
        window=window,
        max_tokens=max_tokens,
    )
    kept = [int(m.content[1:]) for m in result.messages if m.content.startswith("m")]
    return kept, [t.id for t in result.fold], result.prompt_tokens


BASE = PROMPT_OVERHEAD + 10 + 10 + MESSAGE_OVERHEAD  # overhead + max_tokens + new message
M = MESSAGE_OVERHEAD


@pytest.mark.parametrize(
    ("sizes", "window", "kept", "folded"),
    [
        # everything fits
        ((10, 10, 10, 10), BASE + 4 * (10 + M), [1, 2, 3, 4], []),
        # one message short: the oldest pair goes (the answer would start the prompt)
        ((10, 10, 10, 10), BASE + 4 * (10 + M) - 1, [3, 4], [1, 2]),
        # room for exactly the last pair
        ((10, 10, 10, 10), BASE + 2 * (10 + M), [3, 4], [1, 2]),
        # room for the last message only: it is an answer, so nothing of the history stays
        ((10, 10, 10, 10), BASE + 1 * (10 + M), [], [1, 2, 3, 4]),
        # no room for history at all
        ((10, 10), BASE, [], [1, 2]),
        # a huge old message does not block newer ones
        ((5000, 10, 10, 10), BASE + 3 * (10 + M), [3, 4], [1, 2]),
        # an odd history (starts with an answer) keeps its newest question onwards
        ((10, 10, 10), BASE + 3 * (10 + M), [1, 2, 3], []),
        # empty history
        ((), BASE, [], []),
    ],
)
def test_history_is_kept_newest_first_and_starts_with_a_question(
    sizes: tuple[int, ...], window: int, kept: list[int], folded: list[int]
) -> None:
    got_kept, got_folded, tokens = plan(turns(*sizes), window=window)
    assert (got_kept, got_folded) == (kept, folded)
    assert tokens + 10 <= window  # the prompt and max_tokens fit


def test_the_prompt_never_exceeds_the_window() -> None:
    import random

    rng = random.Random(7)
    for _ in range(500):
        sizes = [rng.randint(1, 300) for _ in range(rng.randint(0, 40))]
        window = rng.randint(BASE + 40, 4000)
        try:
            _kept, folded, tokens = plan(
                turns(*sizes), window=window, summary="s", extra=rng.randint(0, 30)
            )
        except ContextTooLong:
            continue
        assert tokens + 10 <= window
        # What is folded is always the oldest part, in order.
        assert folded == list(range(1, len(folded) + 1))


def test_system_prompt_and_summary_come_first_in_one_message() -> None:
    result = build_context(
        system="Be brief.",
        system_tokens=3,
        summary="The user is Ada.",
        summary_tokens=5,
        history=turns(10, 10),
        new=[Counted("user", "hi", 1)],
        window=1000,
        max_tokens=10,
    )
    first = result.messages[0]
    assert first.role == "system"
    assert first.content == f"Be brief.\n\n{SUMMARY_HEADER}\nThe user is Ada."
    assert [m.role for m in result.messages] == ["system", "user", "assistant", "user"]
    assert system_text(None, "S") == f"{SUMMARY_HEADER}\nS"
    assert system_text("P", None) == "P"
    assert system_text(None, None) is None


def test_new_messages_alone_too_long_is_an_error() -> None:
    with pytest.raises(ContextTooLong) as caught:
        plan([], window=BASE - 1)
    assert caught.value.window == BASE - 1
    with pytest.raises(ContextTooLong):  # the summary counts too
        plan([], window=BASE + 5, summary="s", extra=10)


@pytest.mark.parametrize(
    ("sizes", "window", "folded"),
    [
        ((10, 10), 1000, []),  # well under half the window
        # 10 messages of 42 (with overhead 50) = 500 > 400 (half of 800): fold down to 200
        ((42,) * 10, 800, [1, 2, 3, 4, 5, 6]),
        # the cut never leaves an answer first
        ((42,) * 9, 700, [1, 2, 3, 4, 5, 6]),
        ((1000,), 100, [1]),  # one huge message: folded whole
    ],
)
def test_proactive_fold(sizes: tuple[int, ...], window: int, folded: list[int]) -> None:
    got = [t.id for t in proactive_fold(turns(*sizes), window)]
    assert got == folded
    kept = turns(*sizes)[len(got) :]
    if got:
        assert sum(t.tokens + M for t in kept) <= window * 0.25 or kept == []
        assert not kept or kept[0].role == "user"


@pytest.mark.parametrize(
    ("request_msgs", "tail", "repeated"),
    [
        ([("user", "hi")], [], 0),
        ([("user", "hi")], [("user", "hi"), ("assistant", "yo")], 0),  # a new "hi"
        # a front end resending the whole history
        (
            [("user", "a"), ("assistant", "b"), ("user", "c")],
            [("user", "a"), ("assistant", "b")],
            2,
        ),
        # only the tail of a longer stored history
        (
            [("user", "c"), ("assistant", "d"), ("user", "e")],
            [("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")],
            2,
        ),
        # history that does not match: all of it is new
        (
            [("user", "x"), ("assistant", "y"), ("user", "z")],
            [("user", "a"), ("assistant", "b")],
            0,
        ),
        # the last message is always new, even if it repeats the stored one
        ([("user", "a"), ("user", "a")], [("user", "a")], 1),
    ],
)
def test_repeated_history_is_recognised(
    request_msgs: list[tuple[str, str]], tail: list[tuple[str, str]], repeated: int
) -> None:
    assert new_messages(request_msgs, tail) == repeated


def test_fold_chunks_fit_the_window_and_keep_order() -> None:
    history = turns(*([300] * 20))
    window = 2048
    chunks = fold_chunks(history, summary_tokens=200, window=window)
    assert [t.id for chunk in chunks for t in chunk] == list(range(1, 21))
    assert len(chunks) > 1
    for chunk in chunks:
        messages = fold_prompt("previous", chunk, window)
        needed = PROMPT_OVERHEAD + summary_limit(window)
        needed += sum(estimate_tokens(m.content) + M for m in messages)
        assert needed <= window * 1.25  # estimates run high; the real count is lower


def test_a_message_longer_than_a_summary_job_is_shortened_in_the_middle() -> None:
    text = "start " + "filler " * 5000 + "end"
    huge = Turn(id=1, role="user", content=text, tokens=estimate_tokens(text))
    messages = fold_prompt(None, [huge], window=1024)
    body = messages[-1].content
    assert body.startswith("Conversation:\nuser: start")
    assert body.endswith("end\n\nWrite the summary.") and "[…]" in body
    again = fold_prompt("Ada keeps goats.", [Turn(2, "user", "hi", 1)], window=1024)
    assert again[-1].content == (
        "Summary so far:\nAda keeps goats.\n\nNew messages:\nuser: hi\n\nWrite the updated summary."
    )
    assert estimate_tokens(body) < 1024


@pytest.mark.parametrize(
    ("answer", "title"),
    [
        ("Otter sleeping habits", "Otter sleeping habits"),
        ('"Otter sleeping habits"', "Otter sleeping habits"),
        ("Title: Otters at night\nMore text", "Otters at night"),
        ("\n\n  **Otters**  \n", "Otters"),
        ("", None),
        ('""', None),
        ("word " * 40, ("word " * 40)[:79].rsplit(" ", 1)[0].rstrip() + "…"),
    ],
)
def test_model_titles_are_cleaned(answer: str, title: str | None) -> None:
    got = clean_title(answer)
    assert got == title
    assert got is None or len(got) <= 80


@pytest.mark.parametrize(
    ("question", "title"),
    [
        ("  How do   otters\nsleep?  ", "How do otters sleep?"),
        ("", "New conversation"),
        ("   ", "New conversation"),
        ("x" * 200, "x" * 79 + "…"),
    ],
)
def test_fallback_titles(question: str, title: str) -> None:
    assert fallback_title(question) == title


@pytest.mark.parametrize(
    ("answer", "summary"),
    [
        ("Ada keeps goats.", "Ada keeps goats."),
        ("Here is the updated summary:\n\nAda keeps goats.", "Ada keeps goats."),
        ("Summary: Ada keeps goats.", "Ada keeps goats."),
        ("Here is the updated summary:", None),
        ("", None),
        ("   \n", None),
        # a model continuing the prompt's pattern: cut where it starts echoing
        (
            "Ada keeps goats.\n\nNew messages:\nuser: hi\n\nWrite the updated summary.",
            "Ada keeps goats.",
        ),
        ("user: hello\nassistant: hi", None),
    ],
)
def test_summary_answers_are_cleaned(answer: str, summary: str | None) -> None:
    assert clean_summary(answer) == summary
