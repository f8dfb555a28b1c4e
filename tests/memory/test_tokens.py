"""Token counting: the model's own tokenizer when the gateway has its file, else an
estimate that stays above the real count."""

from __future__ import annotations

from pathlib import Path

import pytest

from swarmgate.memory.tokens import (
    ESTIMATE,
    MESSAGE_OVERHEAD,
    TokenCounters,
    VocabCounter,
    bundled_locator,
    estimate_tokens,
)

MODEL = "smollm2-135m-instruct-q4_1"

CORPUS = {
    "english": "The quick brown fox jumps over the lazy dog. Conversation memory keeps every "
    "fact, name and number that matters, so later answers can use them without the client "
    "sending the whole history again.",
    "code": "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + "
    "fib(n - 2)\n\nprint([fib(i) for i in range(10)])\n",
    "json": '{"id": "conv_8f3a", "messages": [{"role": "user", "content": "hi"}], "n": 12345}',
    "numbers": "3.14159265358979 2718281828 1,234,567.89 0xDEADBEEF 2026-11-22T13:45:00Z",
    "german": "Die Straße war lang, und die Bäume standen still im Nebel über dem Fluss.",
    "french": "Où est la bibliothèque ? Elle se trouve à côté de l'église, près du marché.",
    "chinese": "对话记忆会保存每一个事实、名字和数字,以便后来的回答可以使用它们。",
    "japanese": "会話の記憶は、すべての事実、名前、数字を保存します。",
    "russian": "Память разговора хранит каждый факт, имя и число.",
    "emoji": "Great job 🎉🎉 see you 👋 soon 🚀✨",
    "url": "https://example.com/v1/conversations?limit=20&after=conv_abc123#frag",
    "whitespace": "a\n\n\n\n    b\t\t\tc          d\n",
    "hex": "a3f9c2e17b4d8e0f6a5b3c2d1e0f9a8b7c6d5e4f",
    "shouting": "PLEASE SUMMARISE THE QUARTERLY REPORT FOR THE BOARD MEETING ON FRIDAY",
    "identifiers": "getUserById parseHTTPResponse XMLHttpRequest snake_case_name __init__",
}


@pytest.fixture(scope="module")
def smollm2() -> VocabCounter:
    path = bundled_locator(MODEL)
    if path is None:
        pytest.skip("the bundled SmolLM2 model is not installed")
    pytest.importorskip("llama_cpp")
    return VocabCounter(MODEL, path)


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_the_estimate_stays_above_smollm2s_count(smollm2: VocabCounter, name: str) -> None:
    text = CORPUS[name]
    real = smollm2.count(text)
    estimate = estimate_tokens(text)
    # Per message the template overhead (which both ways of counting add) absorbs the
    # odd token the estimate misses in dense numbers.
    assert estimate + MESSAGE_OVERHEAD >= real, (estimate, real)
    assert estimate <= 2.5 * real + 4  # and still useful: not wildly above


def test_the_estimate_over_the_whole_corpus(smollm2: VocabCounter) -> None:
    text = "\n".join(CORPUS.values())
    assert smollm2.count(text) <= estimate_tokens(text) <= 2 * smollm2.count(text)


def test_random_letters_are_the_known_weak_spot(smollm2: VocabCounter) -> None:
    # Documented in tokens.py: strings without the shape of words can take a token a
    # letter; Memory keeps a tenth of the window spare when it estimates.
    text = "xqzvk plmrtw gzzyx qwfjv bnnmkl zxcvqwe rtyuio"
    assert estimate_tokens(text) < smollm2.count(text) <= len(text)


def test_the_vocabulary_counter_is_exact(smollm2: VocabCounter) -> None:
    assert smollm2.count("") == 0
    assert smollm2.count("hello") == 1
    assert smollm2.count(" the the the") == 3


@pytest.mark.parametrize(
    ("text", "at_least"),
    [("", 0), ("a", 1), ("hello world", 2), ("12345", 5), ("€", 3), ("  ", 1), ("a\n", 2)],
)
def test_estimate_table(text: str, at_least: int) -> None:
    assert estimate_tokens(text) >= at_least


def test_counters_fall_back_to_the_estimate(tmp_path: Path) -> None:
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf")
    counters = TokenCounters(locator=lambda model: broken if model == "broken" else None)
    assert counters.get("anything") is ESTIMATE  # before loading: the estimate
    assert counters.load("unknown") is ESTIMATE  # no file for it
    assert counters.load("broken") is ESTIMATE  # a file llama.cpp cannot read
    assert counters.loaded("broken") and counters.get("broken") is ESTIMATE


def test_counters_load_the_bundled_tokenizer(smollm2: VocabCounter) -> None:
    counters = TokenCounters()
    counter = counters.load(MODEL)
    assert isinstance(counter, VocabCounter) and counter.name == MODEL
    assert counters.get(MODEL) is counter
    assert counter.count(CORPUS["english"]) == smollm2.count(CORPUS["english"])
