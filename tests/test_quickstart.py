"""``swarmgate up``: one command gives a working API; Ctrl-C stops everything cleanly."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import MODEL, free_port, swarmgate_cmd


def _start_up(data_dir: Path, port: int, *extra: str) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(  # noqa: S603
        swarmgate_cmd("up", "--data-dir", str(data_dir), "--port", str(port), *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "Press Ctrl-C to stop" in line:
            return process, "".join(lines)
    process.kill()
    raise AssertionError("swarmgate up never became ready:\n" + "".join(lines))


def _stop(process: subprocess.Popen[str]) -> tuple[int, str]:
    process.send_signal(signal.SIGINT)
    try:
        out, _ = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
        raise AssertionError("swarmgate up did not stop on Ctrl-C") from None
    return process.returncode, out


def _check_banner_and_call(banner: str, port: int) -> str:
    base = f"http://127.0.0.1:{port}"
    assert f"{base}/v1" in banner
    key_match = re.search(r"API key\s*:\s*(sg_live_\S+)", banner)
    assert key_match, banner
    key = key_match.group(1)
    assert f"curl {base}/v1/chat/completions" in banner
    assert "from openai import OpenAI" in banner
    response = httpx.post(
        f"{base}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": MODEL, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 8},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"].strip()
    return key


def test_up_with_a_simulated_device(tmp_path: Path) -> None:
    port = free_port()
    process, banner = _start_up(tmp_path, port, "--backend", "sim")
    try:
        key = _check_banner_and_call(banner, port)
    finally:
        code, out = _stop(process)
    assert code == 0, out
    assert "Stopped." in out
    assert "Traceback" not in out
    # A second run reuses the same account and key.
    process, banner = _start_up(tmp_path, port, "--backend", "sim")
    try:
        assert _check_banner_and_call(banner, port) == key
    finally:
        assert _stop(process)[0] == 0
    assert (tmp_path / "credentials.json").stat().st_mode & 0o077 == 0


@pytest.mark.llama
def test_up_with_the_bundled_model(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    port = free_port()
    process, banner = _start_up(tmp_path, port)
    try:
        _check_banner_and_call(banner, port)
    finally:
        code, out = _stop(process)
    assert code == 0, out
