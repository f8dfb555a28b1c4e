"""Whole runs in real processes: ``swarmgate serve`` plus ``swarmgate node``, over real sockets,
driven by the official OpenAI SDK. Also checks that no prompt or completion text reaches any
log, at DEBUG level."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest

from tests.conftest import MODEL, free_port, run_cli, swarmgate_cmd, wait_http

ADMIN = "e2e-admin-token-0123456789"


@contextmanager
def network(tmp_path: Path, backend: str, *node_args: str) -> Iterator[tuple[str, str, Path]]:
    """A gateway and one node as separate processes; yields (base_url, api_key, log_dir)."""
    port = free_port()
    env = {
        **os.environ,
        "SWARMGATE_DATA_DIR": str(tmp_path / "data"),
        "SWARMGATE_PORT": str(port),
        "SWARMGATE_ADMIN_TOKEN": ADMIN,
        "SWARMGATE_LOG_LEVEL": "DEBUG",
        "SWARMGATE_NODE_CACHE_DIR": str(tmp_path / "models"),
        "PYTHONUNBUFFERED": "1",
    }
    admin = {k: env[k] for k in ("SWARMGATE_DATA_DIR", "SWARMGATE_ADMIN_TOKEN")}
    developer = json.loads(
        run_cli(
            "admin", "--json", "accounts", "create", "--name", "d", "--credits", "5", env=admin
        ).stdout
    )
    key = json.loads(
        run_cli("admin", "--json", "keys", "create", "--account", developer["id"], env=admin).stdout
    )["key"]
    provider = json.loads(
        run_cli(
            "admin", "--json", "accounts", "create", "--name", "p", "--provider", env=admin
        ).stdout
    )
    token = json.loads(
        run_cli(
            "admin", "--json", "devices", "create", "--account", provider["id"], env=admin
        ).stdout
    )["token"]
    logs = tmp_path / "logs"
    logs.mkdir()
    processes: list[subprocess.Popen[bytes]] = []
    try:
        with (logs / "gateway.log").open("wb") as gateway_log:
            processes.append(
                subprocess.Popen(  # noqa: S603
                    swarmgate_cmd("serve"), env=env, stdout=gateway_log, stderr=subprocess.STDOUT
                )
            )
        wait_http(f"http://127.0.0.1:{port}/healthz")
        with (logs / "node.log").open("wb") as node_log:
            processes.append(
                subprocess.Popen(  # noqa: S603
                    swarmgate_cmd(
                        "node",
                        "--backend",
                        backend,
                        "--token",
                        token,
                        "--gateway",
                        f"ws://127.0.0.1:{port}/v1/nodes/connect",
                        *node_args,
                    ),
                    env=env,
                    stdout=node_log,
                    stderr=subprocess.STDOUT,
                )
            )
        base_url = f"http://127.0.0.1:{port}/v1"
        with openai.OpenAI(base_url=base_url, api_key=key, max_retries=0) as client:
            deadline = time.monotonic() + 120  # model load
            while not any(
                m.model_extra and m.model_extra.get("available")
                for m in client.models.list().data
                if m.id == MODEL
            ):
                assert processes[1].poll() is None, (logs / "node.log").read_text()
                assert time.monotonic() < deadline, "the device never came up"
                time.sleep(0.2)
        yield base_url, key, logs
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in reversed(processes):
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _exercise(base_url: str, key: str, prompt: str, max_tokens: int) -> tuple[str, int, str, int]:
    with openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120) as client:
        reply = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0,
            seed=1,
        )
        assert reply.usage is not None
        stream = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0,
            seed=1,
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces: list[str] = []
        usage = None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content is not None:
                pieces.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                usage = chunk.usage
        assert usage is not None
        assert usage.completion_tokens == len(pieces), "streamed chunks ≠ completion tokens"
        return (
            reply.choices[0].message.content or "",
            reply.usage.completion_tokens,
            "".join(pieces),
            usage.completion_tokens,
        )


@pytest.mark.llama
def test_real_model_through_the_openai_sdk(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    marker = "ZEBRA-QUOKKA-7731"
    prompt = f"My code word is {marker}. Name three colours."
    with network(tmp_path, "llama-cpp") as (base_url, key, logs):
        text, tokens, streamed, streamed_tokens = _exercise(base_url, key, prompt, 24)
        time.sleep(0.3)
    assert text.strip(), "empty answer from the real model"
    assert streamed.strip()
    assert 0 < tokens <= 24 and 0 < streamed_tokens <= 24
    # Greedy decoding with a fixed seed: streamed and non-streamed answers agree.
    assert streamed == text
    _assert_private(logs, [marker, prompt, text.strip(), streamed.strip()])


def test_no_prompt_or_completion_text_in_any_log(tmp_path: Path) -> None:
    marker = "PELICAN-SECRET-4096"
    prompt = f"Remember {marker} and tell nobody."
    with network(tmp_path, "sim", "--sim-length", "12") as (base_url, key, logs):
        text, _, streamed, _ = _exercise(base_url, key, prompt, 12)
        time.sleep(0.3)
    assert text and streamed
    _assert_private(logs, [marker, prompt, text, streamed])


def _assert_private(logs: Path, secrets: list[str]) -> None:
    written = {p.name: p.read_text(errors="replace") for p in logs.iterdir()}
    assert any("device connected" in text for text in written.values()), "DEBUG logs missing"
    for name, text in written.items():
        for secret in secrets:
            assert secret not in text, f"{name} contains request or answer text"
