"""LiteLLM proxy against Swarmgate, both in front of the same local mock OpenAI upstream.

    .venv/bin/python benchmarks/litellm_compare.py            # full run (10-20 minutes)
    .venv/bin/python benchmarks/litellm_compare.py --quick    # smoke run (~1-2 minutes)
    .venv/bin/python benchmarks/litellm_compare.py --reps 5 --concurrency 32

The first run creates a separate virtualenv for LiteLLM (``LITELLM_VENV``, outside the
repository) and installs ``litellm[proxy]==LITELLM_VERSION`` from PyPI into it (about a
minute); later runs reuse it, and reinstall only when the version there differs.

What is compared, in one run on one machine:

* ``direct``: the load generator straight to the mock upstream: the floor. Every
  "added" figure is a gateway's latency minus this one (a difference of percentiles,
  not a percentile of differences);
* ``litellm``: the LiteLLM proxy (``litellm --config … --num_workers 1``: one uvicorn
  worker with uvloop, one process), one model routed to the mock (``openai/`` provider,
  ``api_base`` the mock), authenticated with a master key, no database, logging at
  ERROR, the local model-cost map (``LITELLM_LOCAL_MODEL_COST_MAP=True``), no Hugging
  Face tokenizer downloads (``disable_hf_tokenizer_download``, ``HF_HUB_OFFLINE=1``):
  it makes no call off the box;
* ``swarmgate cloud``: ``swarmgate serve`` (one process, SQLite in a temp dir, billing on
  as by default: a credit hold and a settled charge per request, an API key created
  through the admin CLI) with the mock as the cloud upstream that the catalog names for
  the cloud-tier model ``@cf/meta/llama-3.2-3b-instruct`` (``SWARMGATE_UPSTREAMS``);
* ``swarmgate p2p``: the same gateway, model ``smollm2-135m-instruct-q4_1`` served by one
  ``swarmgate node --backend sim --slots 256 --sim-length 16`` (answers at once). The
  device stands in for the upstream; its "added" figures are also against ``direct``.

The mock upstream is ``benchmarks/floor_app.py`` (uvicorn + uvloop + httptools, a bare
ASGI callable) serving a fixed ``chat.completion`` with ``usage``, or, when asked to
stream, 16 content chunks, a finishing chunk, a usage chunk and ``[DONE]``. The same
request goes to ``direct``, ``litellm`` and ``swarmgate cloud``; p2p gets the same
prompt and ``max_tokens`` for its own model (16 content chunks too).

Pinning (2-core box, ``taskset``): core 0 runs LiteLLM and ``swarmgate serve``, both
started up front, only one of them loaded at a time (the other idles); core 1 runs the
mock upstream, the sim node and this process, the load generator (``gateway_overhead``'s
asyncio + uvloop raw HTTP/1.1 keep-alive client). So each gateway has one core to itself
while measured, and the mock, the device and the client share the other.

Phases, each repeated ``--reps`` times with the four targets taking turns (their order
reversed on every other repetition, so drift on the box hits them all), a warm-up before
each measurement, medians of the repetitions reported:

* ``c1``: concurrency 1, not streamed: unloaded latency p50/p99;
* ``stream``: concurrency 1, ``stream: true``: time to the first content chunk p50/p99;
* ``load``: ``--concurrency`` connections (default 64), closed loop, not streamed:
  requests/s, and the server's CPU per request (psutil, user + system, all threads);
* ``load_stream``: the same, streamed.

Before measuring, one answer of each kind is fetched from every target and checked (the
mock's text through LiteLLM and the cloud path, the first content chunk not empty);
every phase counts non-200 answers and broken connections as errors. After the run the
gateway's ledger is read: one charge per answered Swarmgate request.

Results go to ``benchmarks/results/litellm_compare-<time>.json`` and a markdown table is
printed, with the ratios the issue sets as targets (Swarmgate cloud at least 25 times LiteLLM's
throughput, at most a tenth of its added latency).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from billing_overhead import ledger_check  # noqa: E402
from gateway_overhead import (  # noqa: E402
    CLIENT_CORE,
    GATEWAY_CORE,
    MAX_TOKENS,
    MODEL,
    PROMPT,
    RESULTS,
    ROOT,
    Run,
    Stack,
    closed_loop,
    cpu_meter,
    exit_on_sigterm,
    free_port,
    machine,
    median_of,
    start_stack,
    summarize,
    taskset,
    wait_quiet,
    wait_until,
)

LITELLM_VERSION = "1.106.2"
LITELLM_VENV = Path.home() / ".cache" / "swarmgate" / f"litellm-{LITELLM_VERSION}-venv"
CLOUD_MODEL = "@cf/meta/llama-3.2-3b-instruct"
MASTER_KEY = "sk-bench-litellm-master-0123456789"
MOCK_KEY = "sk-bench-mock-upstream"
# The mock's answer: 16 pieces, as many content chunks as the sim device streams.
ANSWER = [
    "Hello",
    " swarm,",
    " here",
    " is",
    " a",
    " short",
    " fixed",
    " answer",
    " from",
    " the",
    " mock",
    " upstream",
    " for",
    " this",
    " benchmark",
    " run.",
]
USAGE = {"prompt_tokens": 20, "completion_tokens": len(ANSWER), "total_tokens": 20 + len(ANSWER)}
TARGETS = ("direct", "litellm", "sg_cloud", "sg_p2p")
LABELS = {
    "direct": "direct to the mock (floor)",
    "litellm": f"LiteLLM {LITELLM_VERSION}",
    "sg_cloud": "Swarmgate cloud",
    "sg_p2p": "Swarmgate p2p (sim device)",
}
PHASES = ("c1", "stream", "load", "load_stream")
# Log lines that would mean LiteLLM tried to reach the internet.
OUTWARD_SIGNS = ("Name or service not known", "ConnectError", "Failed to fetch", "huggingface.co")


# -- LiteLLM's own virtualenv --------------------------------------------------------------
def installed_version(venv: Path) -> str | None:
    python = venv / "bin" / "python"
    if not (venv / "bin" / "litellm").exists():
        return None
    out = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    return out.stdout.strip() or None


def ensure_litellm(venv: Path, log: Callable[[str], None]) -> str:
    """The LiteLLM version in ``venv``, installing ``litellm[proxy]`` there first if needed."""
    version = installed_version(venv)
    if version == LITELLM_VERSION:
        return version
    log(f"installing litellm[proxy]=={LITELLM_VERSION} into {venv} (once; about a minute)")
    if not (venv / "bin" / "python").exists():
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            f"litellm[proxy]=={LITELLM_VERSION}",
        ],
        check=True,
        timeout=1800,
    )
    version = installed_version(venv)
    if version != LITELLM_VERSION:
        raise RuntimeError(f"{venv} has litellm {version}, not {LITELLM_VERSION}")
    return version


# -- the mock upstream and LiteLLM ---------------------------------------------------------
def mock_answers(data_dir: Path) -> tuple[Path, Path]:
    """The mock's fixed answers, in the files ``floor_app.py`` serves."""
    base = {"id": "chatcmpl-mock", "created": 1_700_000_000, "model": CLOUD_MODEL}
    completion = {
        **base,
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(ANSWER)},
                "finish_reason": "stop",
            }
        ],
        "usage": USAGE,
    }
    chunks: list[dict[str, Any]] = [
        {
            **base,
            "object": "chat.completion.chunk",
            "choices": [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": piece}
                    if i == 0
                    else {"content": piece},
                    "finish_reason": None,
                }
            ],
        }
        for i, piece in enumerate(ANSWER)
    ]
    chunks.append(
        {
            **base,
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        }
    )
    chunks.append({**base, "object": "chat.completion.chunk", "choices": [], "usage": USAGE})
    frames = [b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks] + [b"data: [DONE]\n\n"]
    json_path, frames_path = data_dir / "mock_completion.json", data_dir / "mock_frames.json"
    json_path.write_bytes(orjson.dumps(completion))
    frames_path.write_bytes(orjson.dumps([f.decode() for f in frames]))
    return json_path, frames_path


def litellm_config(data_dir: Path, mock_port: int) -> Path:
    """One model routed to the mock; master key; no database, no callbacks."""
    config = {
        "model_list": [
            {
                "model_name": CLOUD_MODEL,
                "litellm_params": {
                    "model": f"openai/{CLOUD_MODEL}",
                    "api_base": f"http://127.0.0.1:{mock_port}/v1",
                    "api_key": MOCK_KEY,
                },
            }
        ],
        "litellm_settings": {
            "telemetry": False,  # a no-op in recent versions, kept for older ones
            "set_verbose": False,
            # The model name says llama-3: token counting would fetch a Hugging Face
            # tokenizer; this keeps it on the bundled tiktoken encoding instead.
            "disable_hf_tokenizer_download": True,
        },
        "general_settings": {"master_key": MASTER_KEY},
    }
    path = data_dir / "litellm_config.yaml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    return path


def litellm_env() -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("DATABASE_URL", "DIRECT_URL", "VIRTUAL_ENV", "PYTHONPATH")
    }
    env.update(
        {
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            "LITELLM_TELEMETRY": "False",
            "LITELLM_LOG": "ERROR",
            "HF_HUB_OFFLINE": "1",
            "DO_NOT_TRACK": "1",
        }
    )
    return env


def start_aux(
    data_dir: Path, venv: Path, log: Callable[[str], None]
) -> tuple[Stack, int, list[str]]:
    """The mock upstream (core 1) and, started but not waited for, LiteLLM (core 0).

    Returned as a ``Stack`` (``floor_port`` is the mock's port) for its process handling;
    the port LiteLLM listens on and its command line come with it."""
    aux = Stack(data_dir, dict(os.environ), 0, free_port(), MASTER_KEY, "")
    completion, frames = mock_answers(data_dir)
    try:
        aux.procs["mock"] = subprocess.Popen(
            [
                *taskset(CLIENT_CORE),
                sys.executable,
                str(HERE / "floor_app.py"),
                str(aux.floor_port),
                str(completion),
                str(frames),
            ],
            stdout=(data_dir / "mock.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        litellm_port = free_port()
        command = [
            str(venv / "bin" / "litellm"),
            "--config",
            str(litellm_config(data_dir, aux.floor_port)),
            "--host",
            "127.0.0.1",
            "--port",
            str(litellm_port),
            "--num_workers",
            "1",
        ]
        log(f"starting LiteLLM on core {GATEWAY_CORE}: {' '.join(command)}")
        aux.procs["litellm"] = subprocess.Popen(
            [*taskset(GATEWAY_CORE), *command],
            env=litellm_env(),
            cwd=data_dir,
            stdout=(data_dir / "litellm.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
    except BaseException:
        aux.stop()
        raise
    return aux, litellm_port, command


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


# -- requests and checks -------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    name: str
    port: int
    key: str | None
    model: str
    server: str  # which process serves it, for its CPU per request

    def body(self, stream: bool) -> bytes:
        return orjson.dumps(
            {
                "model": self.model,
                "messages": [{"role": "user", "content": PROMPT}],
                "max_tokens": MAX_TOKENS,
                "stream": stream,
            }
        )

    def payload(self, stream: bool) -> bytes:
        body = self.body(stream)
        lines = [
            "POST /v1/chat/completions HTTP/1.1",
            f"Host: 127.0.0.1:{self.port}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
        ]
        if self.key:
            lines.append(f"Authorization: Bearer {self.key}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def check_target(target: Target) -> dict[str, Any]:
    """One plain and one streamed answer, checked; returns what was seen."""
    headers = {"Authorization": f"Bearer {target.key}"} if target.key else {}
    url = f"http://127.0.0.1:{target.port}/v1/chat/completions"
    with httpx.Client(headers=headers, timeout=30) as client:
        plain = client.post(url, content=target.body(False))
        if plain.status_code != 200:
            raise RuntimeError(f"{target.name}: HTTP {plain.status_code}: {plain.text[:500]}")
        answer = plain.json()
        text = answer["choices"][0]["message"]["content"]
        stream = client.post(url, content=target.body(True))
        if stream.status_code != 200:
            raise RuntimeError(f"{target.name} stream: HTTP {stream.status_code}: {stream.text}")
    chunks = [
        orjson.loads(line[6:])
        for line in stream.text.splitlines()
        if line.startswith("data: ") and line != "data: [DONE]"
    ]
    pieces = [
        choice["delta"].get("content")
        for chunk in chunks
        for choice in chunk.get("choices") or []
        if "content" in (choice.get("delta") or {})
    ]
    # The load generator takes the first chunk that carries a "content" key as the first
    # token: an empty one (a role-only opening chunk with "content": "") would flatter.
    if not pieces or not pieces[0]:
        raise RuntimeError(f"{target.name}: the first content chunk is empty: {stream.text[:500]}")
    if "data: [DONE]" not in stream.text:
        raise RuntimeError(f"{target.name}: the stream did not end with [DONE]")
    if target.name != "sg_p2p":
        expected = "".join(ANSWER)
        if text != expected or "".join(p or "" for p in pieces) != expected:
            raise RuntimeError(f"{target.name}: not the mock's answer: {text!r} / {pieces!r}")
    if target.name == "sg_cloud":
        meta = answer.get("swarmgate") or {}
        if meta.get("inference_type") != "cloud":
            raise RuntimeError(f"sg_cloud: not served by the cloud path: {meta}")
    return {
        "text": text,
        "content_chunks": len([p for p in pieces if p]),
        "usage": answer.get("usage"),
        "swarmgate": answer.get("swarmgate"),
    }


# -- the measurement -----------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    reps: int
    c1_n: int
    c1_max_s: float  # a cap on the c1 phases' time (LiteLLM is slow at concurrency 1)
    load_s: float
    concurrency: int
    warmup_s: float
    quiet_below: float | None  # wait for other processes to use less of a core than this


FULL = Plan(
    reps=3, c1_n=2000, c1_max_s=15.0, load_s=10.0, concurrency=64, warmup_s=2.0, quiet_below=0.25
)
QUICK = Plan(
    reps=1, c1_n=300, c1_max_s=3.0, load_s=3.0, concurrency=64, warmup_s=0.5, quiet_below=None
)


async def measure(
    targets: dict[str, Target],
    pids: dict[str, int],
    plan: Plan,
    log: Callable[[str], None],
    counted: dict[str, int],
) -> dict[str, Any]:
    """Every phase for every target; ``counted`` gets the 200s each target answered
    (warm-ups included), to be matched against the gateway's ledger."""
    runs: dict[str, tuple[bool, Callable[[int, bytes], Any]]] = {
        "c1": (False, lambda port, p: closed_loop(port, p, 1, n=plan.c1_n, duration=plan.c1_max_s)),
        "stream": (
            True,
            lambda port, p: closed_loop(port, p, 1, n=plan.c1_n, duration=plan.c1_max_s),
        ),
        "load": (
            False,
            lambda port, p: closed_loop(port, p, plan.concurrency, duration=plan.load_s),
        ),
        "load_stream": (
            True,
            lambda port, p: closed_loop(port, p, plan.concurrency, duration=plan.load_s),
        ),
    }
    results: dict[str, Any] = {}
    for phase, (stream, go) in runs.items():
        reps: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
        for rep in range(plan.reps):
            order = list(targets) if rep % 2 == 0 else list(reversed(targets))
            for name in order:
                target = targets[name]
                payload = target.payload(stream)
                if plan.quiet_below is not None:
                    await wait_quiet(plan.quiet_below, log, limit_s=10)
                warm = await closed_loop(
                    target.port,
                    payload,
                    min(8, plan.concurrency),
                    duration=plan.warmup_s,
                )
                with cpu_meter(pids) as cpu:
                    run: Run = await go(target.port, payload)
                counted[name] += len(warm.latencies) + len(run.latencies)
                summary = summarize(run, cpu)
                summary["server"] = target.server
                summary["server_cpu_us_per_req"] = summary[f"{target.server}_cpu_us_per_req"]
                summary["server_cpu_util"] = summary[f"{target.server}_cpu_util"]
                summary["warmup_errors"] = warm.errors
                reps[name].append(summary)
                log(
                    f"  {phase} rep {rep + 1} {name}: {summary['rps']:.0f} req/s, "
                    f"p50 {summary['p50_ms']:.3f} ms, p99 {summary['p99_ms']:.3f} ms, "
                    f"first p50 {summary['first_p50_ms']:.3f} ms, "
                    f"{target.server} {summary['server_cpu_us_per_req']:.0f} us/req "
                    f"({summary['server_cpu_util']:.0%} of a core), errors {summary['errors']}"
                    + (f" {summary['statuses']}" if "statuses" in summary else "")
                    + f", other processes {summary['others_cpu_util']:.0%} of a core"
                )
        results[phase] = {name: median_of(r) for name, r in reps.items()}
    return results


def derived(results: dict[str, Any]) -> dict[str, Any]:
    """Added latencies (target - direct) and the ratios the issue asks for."""
    out: dict[str, Any] = {}
    direct_c1, direct_stream = results["c1"]["direct"], results["stream"]["direct"]
    for name in TARGETS[1:]:
        c1, stream = results["c1"][name], results["stream"][name]
        out[name] = {
            "added_p50_ms": c1["p50_ms"] - direct_c1["p50_ms"],
            "added_p99_ms": c1["p99_ms"] - direct_c1["p99_ms"],
            "ttft_added_p50_ms": stream["first_p50_ms"] - direct_stream["first_p50_ms"],
            "ttft_added_p99_ms": stream["first_p99_ms"] - direct_stream["first_p99_ms"],
        }
    lite = out["litellm"]
    for name in ("sg_cloud", "sg_p2p"):
        sg = out[name]
        out[f"{name}_vs_litellm"] = {
            "throughput_x": _ratio(results["load"][name]["rps"], results["load"]["litellm"]["rps"]),
            "stream_throughput_x": _ratio(
                results["load_stream"][name]["rps"], results["load_stream"]["litellm"]["rps"]
            ),
            "cpu_per_request_x": _ratio(
                results["load"]["litellm"]["server_cpu_us_per_req"],
                results["load"][name]["server_cpu_us_per_req"],
            ),
            "added_p50_x": _ratio(lite["added_p50_ms"], sg["added_p50_ms"]),
            "added_p99_x": _ratio(lite["added_p99_ms"], sg["added_p99_ms"]),
            "ttft_added_p50_x": _ratio(lite["ttft_added_p50_ms"], sg["ttft_added_p50_ms"]),
            "ttft_added_p99_x": _ratio(lite["ttft_added_p99_ms"], sg["ttft_added_p99_ms"]),
        }
    cloud = out["sg_cloud_vs_litellm"]
    out["targets"] = {
        "throughput_at_least_25x": cloud["throughput_x"] >= 25,
        "added_p50_at_most_a_tenth": cloud["added_p50_x"] >= 10,
        "ttft_added_p50_at_most_a_tenth": cloud["ttft_added_p50_x"] >= 10,
    }
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("inf")


def table(results: dict[str, Any], extra: dict[str, Any], concurrency: int) -> str:
    rows = [
        f"| system | req/s c{concurrency} | req/s c{concurrency} stream "
        "| server CPU µs/req (stream) | added p50 / p99 ms | TTFT added p50 / p99 ms | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in TARGETS:
        load, load_stream = results["load"][name], results["load_stream"][name]
        errors = sum(results[p][name]["errors"] for p in PHASES)
        if name == "direct":
            c1, stream = results["c1"][name], results["stream"][name]
            latency = f"({c1['p50_ms']:.3f} / {c1['p99_ms']:.3f})"
            ttft = f"({stream['first_p50_ms']:.3f} / {stream['first_p99_ms']:.3f})"
        else:
            d = extra[name]
            latency = f"{d['added_p50_ms']:.3f} / {d['added_p99_ms']:.3f}"
            ttft = f"{d['ttft_added_p50_ms']:.3f} / {d['ttft_added_p99_ms']:.3f}"
        rows.append(
            f"| {LABELS[name]} | {load['rps']:,.0f} | {load_stream['rps']:,.0f} | "
            f"{load['server_cpu_us_per_req']:,.0f} ({load_stream['server_cpu_us_per_req']:,.0f}) "
            f"| {latency} | {ttft} | {errors} |"
        )
    rows += [
        "",
        f"(server CPU: in the c{concurrency} phases, not streamed (streamed). direct: "
        "absolute latency and time to the first chunk, the floor the others are measured "
        "against; its server CPU is the mock's.)",
        "",
        "| against LiteLLM | Swarmgate cloud | Swarmgate p2p |",
        "|---|---:|---:|",
    ]
    cloud, p2p = extra["sg_cloud_vs_litellm"], extra["sg_p2p_vs_litellm"]
    for key, label in (
        ("throughput_x", "throughput ÷ LiteLLM's (target ≥ 25×)"),  # noqa: RUF001
        ("stream_throughput_x", "streamed throughput ÷ LiteLLM's"),
        ("cpu_per_request_x", "LiteLLM's CPU per request ÷ this"),
        ("added_p50_x", "LiteLLM's added p50 ÷ this (target ≥ 10×)"),  # noqa: RUF001
        ("added_p99_x", "LiteLLM's added p99 ÷ this"),
        ("ttft_added_p50_x", "LiteLLM's TTFT added p50 ÷ this (target ≥ 10×)"),  # noqa: RUF001
        ("ttft_added_p99_x", "LiteLLM's TTFT added p99 ÷ this"),
    ):
        rows.append(f"| {label} | {cloud[key]:.1f}× | {p2p[key]:.1f}× |")  # noqa: RUF001
    met = extra["targets"]
    rows.append("")
    rows.append(
        "targets for the cloud path: "
        + ", ".join(f"{k.replace('_', ' ')}: {'met' if v else 'NOT met'}" for k, v in met.items())
    )
    noisy = [
        f"{phase}/{name} {res['others_cpu_util']:.0%}"
        for phase in PHASES
        for name, res in results[phase].items()
        if res.get("others_cpu_util", 0) > 0.10
    ]
    if noisy:
        rows.append(
            "warning: other processes used more than 10% of a core during: "
            + ", ".join(noisy)
            + " (numbers are noisy)"
        )
    return "\n".join(rows)


def books(stack: Stack) -> dict[str, int]:
    """``billing_overhead.ledger_check`` once the gateway has stopped (a stopping gateway
    posts every charge its journal still holds), with the charges the ledger refused,
    kept in ``charge_journal``, and the journal files left (none expected)."""
    stack.stop()
    out = ledger_check(stack)
    db = sqlite3.connect(stack.data_dir / "swarmgate.db")
    try:
        out["journal_failed"] = db.execute("SELECT count(*) FROM charge_journal").fetchone()[0]
    finally:
        db.close()
    out["journal_files"] = len(list((stack.data_dir / "swarmgate.db-charges").glob("*.log")))
    return out


def cloud_upstream_name() -> str:
    """The upstream the catalog names first for the cloud model."""
    from swarmgate.catalog import Catalog

    model = Catalog.load().get(CLOUD_MODEL)
    if model is None or not model.upstreams:
        raise RuntimeError(f"the catalog has no cloud upstream for {CLOUD_MODEL}")
    return str(model.upstreams[0].upstream)


# -- main ----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--reps", type=int, help="repetitions of each phase")
    parser.add_argument("--concurrency", type=int, help="connections in the load phases")
    parser.add_argument(
        "--litellm-venv",
        type=Path,
        default=LITELLM_VENV,
        help=f"LiteLLM's own virtualenv (default {LITELLM_VENV})",
    )
    parser.add_argument(
        "--no-wait-quiet",
        action="store_true",
        help="measure at once, even while other processes keep the box busy",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp data dir")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    overrides: dict[str, Any] = {}
    if args.reps:
        overrides["reps"] = args.reps
    if args.concurrency:
        overrides["concurrency"] = args.concurrency
    if args.no_wait_quiet:
        overrides["quiet_below"] = None
    plan = Plan(**{**plan.__dict__, **overrides})

    def log(line: str) -> None:
        print(line, flush=True)

    version = ensure_litellm(args.litellm_venv, log)
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(0, {CLIENT_CORE})
    exit_on_sigterm()
    started = datetime.now(UTC)
    host = machine()
    host["pinning"] = (
        {
            "litellm": GATEWAY_CORE,
            "swarmgate_gateway": GATEWAY_CORE,
            "mock_upstream": CLIENT_CORE,
            "sim_node": CLIENT_CORE,
            "load_generator": CLIENT_CORE,
        }
        if shutil.which("taskset")
        else None
    )
    data_dir = Path(tempfile.mkdtemp(prefix="swarmgate-litellm-bench-"))
    aux: Stack | None = None
    stack: Stack | None = None
    try:
        aux, litellm_port, litellm_command = start_aux(data_dir, args.litellm_venv, log)
        mock = f"http://127.0.0.1:{aux.floor_port}"
        wait_until(lambda: _http_ok(f"{mock}/"), "mock upstream up", aux)
        upstream = cloud_upstream_name()
        sg_dir = data_dir / "swarmgate"
        sg_dir.mkdir()
        log(f"starting swarmgate serve (core {GATEWAY_CORE}) with the mock as '{upstream}'")
        stack = start_stack(
            sg_dir,
            floor=False,
            extra_env={
                "SWARMGATE_UPSTREAMS": json.dumps(
                    [{"name": upstream, "base_url": f"{mock}/v1", "api_key": MOCK_KEY}]
                )
            },
        )
        wait_until(
            lambda: _http_ok(f"http://127.0.0.1:{litellm_port}/health/liveliness"),
            "LiteLLM up",
            aux,
            timeout=180,
        )
        targets = {
            "direct": Target("direct", aux.floor_port, None, CLOUD_MODEL, "mock"),
            "litellm": Target("litellm", litellm_port, MASTER_KEY, CLOUD_MODEL, "litellm"),
            "sg_cloud": Target(
                "sg_cloud", stack.gateway_port, stack.api_key, CLOUD_MODEL, "gateway"
            ),
            "sg_p2p": Target("sg_p2p", stack.gateway_port, stack.api_key, MODEL, "gateway"),
        }
        checks = {name: check_target(t) for name, t in targets.items()}
        for name, seen in checks.items():
            log(f"  {name} answers: {seen['text']!r} ({seen['content_chunks']} content chunks)")
        pids = {
            "mock": aux.pid("mock"),
            "litellm": aux.pid("litellm"),
            "gateway": stack.pid("gateway"),
            "node": stack.pid("node"),
        }
        # Answers the ledger should have charged (billing is on): start_stack's two p2p
        # answers (it captures one of each kind) and the checks' two per Swarmgate path.
        counted = {name: 0 for name in targets}
        counted["sg_cloud"] += 2
        counted["sg_p2p"] += 4
        import uvloop

        results = uvloop.run(measure(targets, pids, plan, log, counted))
        ledger = books(stack)
        ledger["answered"] = counted["sg_cloud"] + counted["sg_p2p"]
        litellm_log = (data_dir / "litellm.log").read_text(errors="replace")
        litellm_yaml = (data_dir / "litellm_config.yaml").read_text()
        outward = [
            line for line in litellm_log.splitlines() if any(s in line for s in OUTWARD_SIGNS)
        ]
    finally:
        for running in (stack, aux):
            if running is not None:
                running.stop()
        if not args.keep:
            shutil.rmtree(data_dir, ignore_errors=True)
    extra = derived(results)
    report = {
        "benchmark": "litellm_compare",
        "started_at": started.isoformat(),
        "quick": args.quick,
        "command": " ".join(["python", "benchmarks/litellm_compare.py", *(argv or sys.argv[1:])]),
        "plan": plan.__dict__,
        "machine": host,
        "litellm": {
            "version": version,
            "venv": str(args.litellm_venv),
            "command": litellm_command,
            "config": json.loads(litellm_yaml),
            "env": {k: v for k, v in litellm_env().items() if k not in os.environ},
            "outward_call_log_lines": outward[:20],
        },
        "swarmgate": {"cloud_model": CLOUD_MODEL, "cloud_upstream": upstream, "p2p_model": MODEL},
        "checks": checks,
        "ledger": ledger,
        "results": results,
        "derived": extra,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"litellm_compare-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print()
    print(table(results, extra, plan.concurrency))
    print()
    print(
        f"ledger: {ledger['charges']} charges posted for {ledger['answered']} answered "
        f"Swarmgate requests (books sum {ledger['books_sum']}, refused by the ledger "
        f"{ledger['journal_failed']}, journal files left {ledger['journal_files']})"
    )
    if ledger["charges"] != ledger["answered"] or ledger["journal_files"]:
        print("warning: the ledger does not match the answers counted")
    if errors := sum(results[p][n]["errors"] for p in PHASES for n in TARGETS):
        print(f"warning: {errors} requests failed; see the JSON for their status codes")
    if outward:
        print(f"warning: LiteLLM's log shows {len(outward)} attempted outward calls: {outward[0]}")
    print(f"results: {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
