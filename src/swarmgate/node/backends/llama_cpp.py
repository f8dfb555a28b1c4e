"""The ``llama-cpp`` backend: GGUF models in-process through llama-cpp-python.

llama.cpp contexts are not thread-safe, so each model gets ``slots`` independent
``Llama`` instances and a job borrows one for its whole run. Generation runs on a
worker thread (it blocks on the CPU for every token) and hands events to the
event loop with ``call_soon_threadsafe``; a stop flag checked between tokens ends
it within one token when the consumer goes away.

Prompt and completion text stay in memory only: nothing here logs or prints them.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from swarmgate.node.backends.base import (
    BackendError,
    Finished,
    GenerationEvent,
    GenerationRequest,
    TokenDelta,
)
from swarmgate.node.bundled import (
    BUNDLED_MODELS,
    BundledModelError,
    cached_sha256,
    find_bundled_model,
)
from swarmgate.protocol import ChatMessage, LoadedModel

if TYPE_CHECKING:
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

log = logging.getLogger(__name__)

# With verbose=False, Llama() silences the process by dup2-ing fds 1 and 2 to
# /dev/null and restoring them afterwards; two loads at once would restore each
# other's /dev/null, so loads take turns.
_LOAD_LOCK = threading.Lock()

# Used only when a GGUF carries no chat template; most instruct models are ChatML.
_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# llama.cpp's LLAMA_DEFAULT_SEED: the sampler draws a random seed.
_RANDOM_SEED = 0xFFFFFFFF

EventSink = Callable[[GenerationEvent | BaseException], None]


def _import_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:
        raise BackendError(
            "the llama-cpp backend needs llama-cpp-python: pip install 'swarmgate[llama]'",
            code="BACKEND_UNAVAILABLE",
        ) from exc
    return llama_cpp


class _InstancePool:
    """The ``Llama`` instances of one model; a job borrows one, FIFO when all are busy.

    ``release`` may be called from any thread (the worker returns its instance), and
    waiters are woken on their own event loop.
    """

    def __init__(self, instances: list[Llama]) -> None:
        self.instances = list(instances)
        self._free = list(instances)
        self._waiters: deque[asyncio.Future[Llama]] = deque()
        self._lock = threading.Lock()
        self._closed = False

    async def acquire(self) -> Llama:
        with self._lock:
            if self._closed:
                raise BackendError("the llama-cpp backend is closed", code="BACKEND_CLOSED")
            if self._free:
                return self._free.pop()
            waiter: asyncio.Future[Llama] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            with self._lock:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
            # Handed an instance just as we were cancelled: pass it on.
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release(waiter.result())
            raise

    def release(self, llm: Llama) -> None:
        with self._lock:
            while self._waiters:
                waiter = self._waiters.popleft()
                try:
                    waiter.get_loop().call_soon_threadsafe(self._hand_over, waiter, llm)
                    return
                except RuntimeError:
                    continue  # that waiter's loop is closed
            self._free.append(llm)

    def _hand_over(self, waiter: asyncio.Future[Llama], llm: Llama) -> None:
        if waiter.done():
            self.release(llm)  # the waiter was cancelled meanwhile
        else:
            waiter.set_result(llm)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            waiters, self._waiters = list(self._waiters), deque()
        for waiter in waiters:
            error = BackendError("the llama-cpp backend is closed", code="BACKEND_CLOSED")
            waiter.get_loop().call_soon_threadsafe(_fail_waiter, waiter, error)
        for llm in self.instances:
            llm.close()
        self.instances.clear()
        self._free.clear()


def _fail_waiter(waiter: asyncio.Future[Llama], error: BackendError) -> None:
    if not waiter.done():
        waiter.set_exception(error)


@dataclass
class _Model:
    id: str
    path: Path
    sha256: str
    pool: _InstancePool
    formatter: Jinja2ChatFormatter


@dataclass(eq=False)  # identity-hashed: jobs live in a set
class _Job:
    stop: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)


class LlamaCppBackend:
    name = "llama-cpp"

    def __init__(
        self,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        slots: int = 1,
        model_paths: dict[str, str] | None = None,
        cache_dir: str | None = None,
    ) -> None:
        if slots < 1:
            raise ValueError("slots must be at least 1")
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.slots = slots
        self.model_paths = dict(model_paths or {})
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._models: dict[str, _Model] = {}
        self._jobs: set[_Job] = set()
        self._jobs_lock = threading.Lock()
        self._closing = False

    # -- loading ---------------------------------------------------------------

    async def load(self, model_ids: list[str]) -> list[LoadedModel]:
        """Load the models not loaded yet; models loaded earlier stay loaded."""
        _import_llama_cpp()
        paths = {m: await asyncio.to_thread(self._resolve, m) for m in model_ids}
        for model_id, path in paths.items():
            if model_id not in self._models:
                self._models[model_id] = await asyncio.to_thread(self._load_model, model_id, path)
        return [
            LoadedModel(id=m, sha256=self._models[m].sha256, context_length=self.n_ctx)
            for m in model_ids
        ]

    def _resolve(self, model_id: str) -> Path:
        configured = self.model_paths.get(model_id)
        if configured is not None:
            path = Path(configured).expanduser()
            if not path.is_file():
                raise BackendError(
                    f"model {model_id!r}: configured path {path} is not a file",
                    code="MODEL_NOT_FOUND",
                )
            return path
        try:
            found = find_bundled_model(model_id, cache_dir=self.cache_dir)
        except (BundledModelError, OSError) as exc:
            raise BackendError(f"model {model_id!r}: {exc}", code="MODEL_NOT_FOUND") from exc
        if found is None:
            raise BackendError(
                f"model {model_id!r} has no configured path (model_paths) and is not an "
                "installed bundled model",
                code="MODEL_NOT_FOUND",
            )
        return found

    def _load_model(self, model_id: str, path: Path) -> _Model:
        try:
            digest = cached_sha256(path, self.cache_dir)
        except OSError as exc:
            raise BackendError(
                f"model {model_id!r}: cannot read {path}: {exc}", code="MODEL_NOT_FOUND"
            ) from exc
        instances: list[Llama] = []
        try:
            for _ in range(self.slots):
                instances.append(self._new_instance(model_id, path))
            bundled = BUNDLED_MODELS.get(model_id)
            fallback = bundled.chat_template if bundled is not None else None
            formatter = _chat_formatter(instances[0], fallback)
        except BaseException:
            for llm in instances:
                llm.close()
            raise
        return _Model(model_id, path, digest, _InstancePool(instances), formatter)

    def _new_instance(self, model_id: str, path: Path) -> Llama:
        llama_cpp = _import_llama_cpp()
        try:
            with _LOAD_LOCK:
                llm: Llama = llama_cpp.Llama(
                    model_path=str(path),
                    n_ctx=self.n_ctx,
                    n_threads=self.n_threads,
                    verbose=False,
                )
        except (ValueError, RuntimeError, OSError) as exc:
            raise BackendError(
                f"model {model_id!r}: llama.cpp could not load {path.name}: {exc}",
                code="MODEL_LOAD_FAILED",
            ) from exc
        return llm

    # -- generation ------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        model = self._models.get(request.model)
        if model is None:
            raise BackendError(f"model {request.model!r} is not loaded", code="MODEL_NOT_LOADED")
        self._refuse_if_closing()
        llm = await model.pool.acquire()
        if self._closing:
            model.pool.release(llm)
            self._refuse_if_closing()
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[GenerationEvent | BaseException] = asyncio.Queue()
        job = _Job()

        def emit(item: GenerationEvent | BaseException) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, item)
            except RuntimeError:
                job.stop.set()  # the loop is closed: nobody is listening any more

        def work() -> None:
            try:
                _generate_blocking(llm, model.formatter, request, self.n_ctx, job.stop, emit)
            except BackendError as exc:
                emit(exc)
            except Exception as exc:
                emit(_as_backend_error(exc))
            finally:
                model.pool.release(llm)
                self._end_job(job)

        with self._jobs_lock:
            self._jobs.add(job)
        try:
            threading.Thread(target=work, name=f"llama-{request.job_id}", daemon=True).start()
        except BaseException:
            model.pool.release(llm)
            self._end_job(job)
            raise
        try:
            while True:
                item = await events.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, Finished):
                    return
        finally:
            # Consumer done, cancelled or gone: the worker stops before its next token.
            job.stop.set()

    def _refuse_if_closing(self) -> None:
        if self._closing:
            raise BackendError("the llama-cpp backend is closed", code="BACKEND_CLOSED")

    def _end_job(self, job: _Job) -> None:
        with self._jobs_lock:
            self._jobs.discard(job)
        job.done.set()

    async def close(self) -> None:
        self._closing = True
        # Freeing a model under a running worker would crash the process: stop the
        # workers and wait for them (a job may have started while we waited).
        while True:
            with self._jobs_lock:
                jobs = list(self._jobs)
            if not jobs:
                break
            for job in jobs:
                job.stop.set()
            for job in jobs:
                await asyncio.to_thread(job.done.wait)
        models, self._models = self._models, {}
        for model in models.values():
            model.pool.close()


def _as_backend_error(exc: Exception) -> BackendError:
    # Jinja and llama.cpp messages name template rules and return codes, never the prompt.
    error = BackendError(
        f"llama.cpp generation failed: {type(exc).__name__}: {exc}"[:500],
        code="GENERATION_FAILED",
    )
    error.__cause__ = exc
    return error


def _chat_formatter(llm: Llama, fallback: str | None = None) -> Jinja2ChatFormatter:
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template") or fallback
    if not template:
        log.warning("GGUF has no tokenizer.chat_template; falling back to ChatML")
        template = _CHATML_TEMPLATE
    eos = llm.token_eos()
    bos = llm.token_bos()
    return Jinja2ChatFormatter(
        template=template,
        eos_token=_special_text(llm, eos),
        bos_token=_special_text(llm, bos),
        add_generation_prompt=True,
    )


def _special_text(llm: Llama, token: int) -> str:
    if token < 0:
        return ""
    return llm.detokenize([token], special=True).decode("utf-8", errors="replace")


def _prompt_tokens(
    llm: Llama,
    formatter: Jinja2ChatFormatter,
    messages: list[ChatMessage],
    continue_final: bool = False,
) -> list[int]:
    """The prompt through the model's chat template, with the assistant turn opened.

    For a continuation the last message is the partial answer: the conversation before
    it is rendered (ending with the opened assistant turn) and the partial text follows
    verbatim, so generation picks up mid-answer instead of starting a new turn.
    """
    partial = ""
    if continue_final and messages and messages[-1].role == "assistant":
        partial = messages[-1].content
        messages = messages[:-1]
    chat: Any = [{"role": m.role, "content": m.content} for m in messages]
    rendered = formatter(messages=chat)
    # The template writes BOS and the role markers itself, so no extra BOS and
    # special tokens are parsed as such.
    tokens: list[int] = llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=False, special=True)
    if partial:
        # Model output is plain text: nothing in it may become a control token.
        tokens += llm.tokenize(partial.encode("utf-8"), add_bos=False, special=False)
    return tokens


def _end_of_generation(llm: Llama) -> Callable[[int], bool]:
    vocab = getattr(getattr(llm, "_model", None), "vocab", None)
    if vocab is None:
        eos = llm.token_eos()
        return lambda token: token == eos
    import llama_cpp

    # EOG covers every end token (e.g. <|im_end|> and <|endoftext|>), not only EOS.
    return lambda token: bool(llama_cpp.llama_vocab_is_eog(vocab, token))


class _TextStream:
    """Turns tokens into text: UTF-8 split across tokens is reassembled, and text that
    might begin a stop string is held back until it is known not to."""

    def __init__(self, llm: Llama, stops: list[str]) -> None:
        self._llm = llm
        self._stops = [s for s in stops if s]
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""

    def push(self, token: int) -> tuple[str, bool]:
        """The text this token releases, and whether a stop string was hit."""
        self._pending += self._decoder.decode(self._llm.detokenize([token]))
        cut = self._stop_index()
        if cut is not None:
            released, self._pending = self._pending[:cut], ""
            return released, True
        keep = self._held_length()
        split = len(self._pending) - keep
        released, self._pending = self._pending[:split], self._pending[split:]
        return released, False

    def holding(self) -> bool:
        return bool(self._pending) or bool(self._decoder.getstate()[0])

    def flush(self) -> str:
        self._pending += self._decoder.decode(b"", final=True)
        cut = self._stop_index()
        text = self._pending if cut is None else self._pending[:cut]
        self._pending = ""
        return text

    def _stop_index(self) -> int | None:
        found = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
        return min(found) if found else None

    def _held_length(self) -> int:
        # The longest tail of the pending text that is a proper prefix of a stop string.
        longest = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._pending)), longest, -1):
                if self._pending.endswith(stop[:n]):
                    longest = n
                    break
        return longest


def _sampled_tokens(
    llm: Llama, prompt: list[int], request: GenerationRequest
) -> Generator[int, Any, None]:
    params = request.params
    seed = params.seed if params.seed is not None else _RANDOM_SEED
    llm.set_seed(seed & 0xFFFFFFFF)
    # Every prompt is evaluated whole. Reusing the cached prefix of the previous job
    # would evaluate the rest in a smaller batch, and llama.cpp's CPU kernels round
    # differently by batch size on some processors: the same greedy request would then
    # answer differently on its second run (and an honest device fail its canaries).
    llm.reset()  # type: ignore[no-untyped-call]
    # OpenAI semantics: only temperature and top_p shape sampling, so llama.cpp's
    # extra samplers (top-k, min-p, repeat penalty) are neutralised. temp 0 is greedy.
    return llm.generate(
        prompt,
        top_k=0,
        top_p=params.top_p,
        min_p=0.0,
        typical_p=1.0,
        temp=params.temperature,
        repeat_penalty=1.0,
    )


def _generate_blocking(
    llm: Llama,
    formatter: Jinja2ChatFormatter,
    request: GenerationRequest,
    n_ctx: int,
    stop: threading.Event,
    emit: EventSink,
) -> None:
    """Runs on the worker thread: one ``TokenDelta`` per generated token, then ``Finished``."""
    prompt = _prompt_tokens(llm, formatter, request.messages, request.continue_final)
    room = n_ctx - len(prompt)
    if room <= 0:
        raise BackendError(
            f"the prompt is {len(prompt)} tokens; the context holds {n_ctx}",
            code="CONTEXT_LENGTH_EXCEEDED",
        )
    limit = min(request.params.max_tokens, room)
    is_end = _end_of_generation(llm)
    text = _TextStream(llm, request.params.stop)
    produced = 0
    finish: Literal["stop", "length"] = "length"
    # A delta whose text may still grow at the end (held-back text is flushed into it
    # when EOS follows), so the last real token carries it and counts stay exact.
    deferred: str | None = None
    tokens = _sampled_tokens(llm, prompt, request)
    try:
        for token in tokens:
            if stop.is_set():
                return
            if is_end(token):
                finish = "stop"
                break
            if deferred is not None:
                emit(TokenDelta(deferred))
                deferred = None
            produced += 1
            released, hit_stop = text.push(token)
            if hit_stop:
                emit(TokenDelta(released))
                finish = "stop"
                break
            if produced >= limit:
                emit(TokenDelta(released + text.flush()))
                break
            if text.holding():
                deferred = released
            else:
                emit(TokenDelta(released))
    finally:
        tokens.close()
    if stop.is_set():
        return
    if deferred is not None:
        emit(TokenDelta(deferred + text.flush()))
    emit(Finished(finish_reason=finish, prompt_tokens=len(prompt), completion_tokens=produced))
