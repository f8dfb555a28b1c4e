"""Counting tokens for conversation memory: the model's own tokenizer where the gateway
has the model's file, otherwise an estimate that errs on the safe side.

The estimate splits text the way byte-level BPE tokenizers do and charges each piece at
least what those tokenizers spend on it: a lower-case word one token per three letters
(rounded up), a word with capitals inside one per two, every digit a token (several
tokenizers split numbers digit by digit), every other symbol a token, whitespace a
token per four characters (a single space before a word is part of the word), and
every byte of non-ASCII text a token. Measured against SmolLM2's own tokenizer
(tests/memory/test_tokens.py): English prose 1.8 times the real count, code 1.3,
numbers and hex 1.0, other scripts 1.2 to 2.2. Letter strings without the shape of
words (random keys) can take up to a token a letter; the margin that ``Memory`` keeps
when it counts by estimate (a tenth of the window) absorbs a few of those.

A chat template adds tokens around every message (role markers, separators) and some
add a default system prompt; ``MESSAGE_OVERHEAD`` and ``PROMPT_OVERHEAD`` cover those
for both ways of counting.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

log = logging.getLogger("swarmgate.memory")

# Tokens a chat template adds per message, and once per prompt (a default system prompt
# some templates insert, the assistant's opening marker).
MESSAGE_OVERHEAD = 8
PROMPT_OVERHEAD = 48

_PIECES = re.compile(
    r" (?=[A-Za-z])|[A-Za-z]+|[0-9]|[ \t\r\n\f\v]+|[\x21-\x2f\x3a-\x40\x5b-\x60\x7b-\x7e]"
    r"|[^\x00-\x7f]+|.",
    re.S,
)


def estimate_tokens(text: str) -> int:
    """An upper estimate of the tokens ``text`` takes (see the module doc)."""
    total = 0
    for match in _PIECES.finditer(text):
        piece = match.group()
        first = piece[0]
        if first.isascii() and first.isalpha():
            if piece[1:].islower() or len(piece) == 1:
                total += (len(piece) + 2) // 3
            else:  # capitals inside a word: acronyms, hex, identifiers split finely
                total += (len(piece) + 1) // 2
        elif first in " \t\r\n\f\v":
            if len(piece) > 1 or match.end() == len(text) or not text[match.end()].isalpha():
                total += (len(piece) + 3) // 4
        elif first.isascii():
            total += 1
        else:
            total += len(piece.encode("utf-8"))
    return total


class TokenCounter(Protocol):
    name: str

    def count(self, text: str) -> int: ...


class EstimateCounter:
    name = "estimate"

    def count(self, text: str) -> int:
        return estimate_tokens(text)


ESTIMATE = EstimateCounter()


class VocabCounter:
    """A model's own tokenizer: the GGUF's vocabulary only (no weights, no context), via
    llama.cpp's C API. Tokenizing into a zero-length buffer answers the count alone."""

    def __init__(self, name: str, path: Path) -> None:
        import llama_cpp  # optional dependency; the caller falls back without it

        # llama.cpp reports through this logger and prints everything while it is unset
        # (what ``Llama(verbose=False)`` sets, without a model context).
        quiet = logging.getLogger("llama-cpp-python")
        if quiet.level == logging.NOTSET:
            quiet.setLevel(logging.ERROR)
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if model is None:
            raise ValueError(f"llama.cpp could not read {path.name}")
        self.name = name
        self._api = llama_cpp
        self._model = model
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self._lock = threading.Lock()

    def count(self, text: str) -> int:
        data = text.encode("utf-8")
        if not data:
            return 0
        with self._lock:
            found = self._api.llama_tokenize(self._vocab, data, len(data), None, 0, False, False)
        return abs(int(found))

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._api.llama_model_free(self._model)


Locator = Callable[[str], Path | None]


def bundled_locator(model_id: str) -> Path | None:
    """The GGUF of a model shipped as one package file (not the chunked ones, which would
    have to be assembled first)."""
    from swarmgate.node.bundled import BUNDLED_MODELS, find_bundled_model

    entry = BUNDLED_MODELS.get(model_id)
    if entry is None or entry.chunked:
        return None
    return find_bundled_model(model_id)


class TokenCounters:
    """One counter per model, the model's tokenizer when its file can be found and
    llama.cpp is installed, else the estimate. Loading a vocabulary reads a file, so
    ``load`` runs in a worker thread; ``get`` never blocks and answers the estimate until
    the model's own counter is loaded."""

    def __init__(self, locator: Locator | None = bundled_locator) -> None:
        self._locator = locator
        self._counters: dict[str, TokenCounter] = {}
        self._lock = threading.Lock()

    def get(self, model_id: str) -> TokenCounter:
        return self._counters.get(model_id, ESTIMATE)

    def loaded(self, model_id: str) -> bool:
        return model_id in self._counters

    def load(self, model_id: str) -> TokenCounter:
        """Blocking: finds and loads ``model_id``'s tokenizer (call it in a thread)."""
        with self._lock:
            found = self._counters.get(model_id)
            if found is not None:
                return found
            counter: TokenCounter = ESTIMATE
            path = self._locator(model_id) if self._locator is not None else None
            if path is not None:
                try:
                    counter = VocabCounter(model_id, path)
                except Exception as exc:  # no llama.cpp here, or an unreadable file
                    log.warning("no tokenizer for %s, estimating: %s", model_id, exc)
            self._counters[model_id] = counter
            return counter
