"""The node's model store: bundled models first, then GGUFs downloaded into a cache.

Layout under ``cache_dir``::

    <model_id>/<filename>         the verified GGUF
    <model_id>/<filename>.part    a download in progress (resumed with a Range request)
    <model_id>/artifact.json      what was downloaded, from where, and its sha256
    sha256-cache.json             digests by (path, size, mtime) -- ``bundled.DigestCache``

A GGUF appears under its final name only after its size and sha256 were checked and
its bytes fsynced: ``os.replace`` makes that step atomic, so a file under the final
name is a finished, verified download. Resolving one later re-checks its sha256
through the digest cache, which costs a hash only when the file changed.

Disk writes and hashing run on worker threads (``asyncio.to_thread``): the event
loop of a serving node never waits on the disk. Pulls of one model in one process
share one download; two processes pulling the same model are not coordinated.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

import httpx

from swarmgate import __version__
from swarmgate.catalog import Artifact, Catalog, CatalogModel
from swarmgate.errors import ModelStoreError
from swarmgate.node.bundled import (
    BUNDLED_MODELS,
    BundledModelError,
    cached_sha256,
    find_bundled_model,
    find_distribution_file,
)
from swarmgate.node.progress import format_bytes

log = logging.getLogger(__name__)

T = TypeVar("T")

ProgressCallback = Callable[[int, int | None], None]
"""Called with (bytes on disk so far, total bytes or None) as a download moves."""

MANIFEST_NAME = "artifact.json"
PART_SUFFIX = ".part"
# Room left on the disk after a download: a full disk breaks more than the node.
DISK_MARGIN_BYTES = 64 * 1024 * 1024
DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=15.0)
# Each chunk is written and hashed in one worker-thread call.
_CHUNK_BYTES = 512 * 1024
_HASH_BLOCK = 1024 * 1024
_RETRY_DELAY_S = 1.0

_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_FILENAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ +-]{0,254}$")
_CONTENT_RANGE = re.compile(r"^bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)$")


@dataclass(frozen=True, slots=True)
class StoredModel:
    """A model this node can serve without downloading anything."""

    id: str
    path: Path
    size_bytes: int
    sha256: str | None
    source: Literal["bundled", "cache"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "path": str(self.path),
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
            "source": self.source,
        }


@dataclass
class _Download:
    """One download in flight, shared by every ``pull`` of its model."""

    artifact: Artifact
    task: asyncio.Task[Path] | None = None
    listeners: builtins.list[ProgressCallback] = field(default_factory=builtins.list)
    waiters: int = 0

    def notify(self, done: int, total: int | None) -> None:
        for listener in builtins.list(self.listeners):
            listener(done, total)


class _Restart(Exception):
    """The server's file does not continue our part: drop the part and start over."""


class ModelStore:
    """Finds the GGUF for a model id, downloading catalog artifacts into ``cache_dir``.

    Use as ``async with ModelStore(path) as store`` (or call ``aclose``): the store
    keeps a pooled HTTP client for its downloads.
    """

    def __init__(
        self,
        cache_dir: Path | str,
        *,
        catalog: Catalog | None = None,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        disk_margin_bytes: int = DISK_MARGIN_BYTES,
    ) -> None:
        self.cache_dir = Path(cache_dir).expanduser()
        self.disk_margin_bytes = disk_margin_bytes
        self._catalog = catalog
        self._timeout = timeout
        self._client: httpx.AsyncClient | None = None
        self._downloads: dict[str, _Download] = {}

    async def __aenter__(self) -> ModelStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stops downloads still running (their parts stay, to resume) and the client."""
        tasks = [d.task for d in self._downloads.values() if d.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    @property
    def catalog(self) -> Catalog:
        if self._catalog is None:
            self._catalog = Catalog.load()
        return self._catalog

    def artifact_for(self, model_id: str) -> Artifact | None:
        model = self.catalog.get(model_id)
        return model.artifact if model is not None else None

    # -- finding -------------------------------------------------------------------------

    def resolve(self, model_id: str) -> Path | None:
        """The GGUF for ``model_id``: an installed bundled model, else a verified download.

        Blocking (it may hash a file or assemble bundled chunks): call it off the loop.
        """
        _check_model_id(model_id)
        try:
            bundled = find_bundled_model(model_id, cache_dir=self.cache_dir)
        except (BundledModelError, OSError) as exc:
            log.warning("bundled model %s is unusable: %s", model_id, exc)
            bundled = None
        if bundled is not None:
            return bundled
        expected = self._expected_in_cache(model_id)
        if expected is None:
            return None
        filename, sha256, size = expected
        return self._verified(self.cache_dir / model_id / filename, sha256, size)

    def list(self) -> builtins.list[StoredModel]:
        """Installed bundled models, then downloaded ones; nothing is hashed or fetched."""
        entries = [entry for entry in map(self._bundled_entry, BUNDLED_MODELS) if entry]
        if not self.cache_dir.is_dir():
            return entries
        for directory in sorted(self.cache_dir.iterdir()):
            if not directory.is_dir() or not _MODEL_ID.match(directory.name):
                continue
            manifest = _read_manifest(directory)
            if manifest is None:
                continue
            path = directory / manifest["filename"]
            if path.is_file():
                entries.append(
                    StoredModel(
                        id=directory.name,
                        path=path,
                        size_bytes=path.stat().st_size,
                        sha256=manifest["sha256"],
                        source="cache",
                    )
                )
        return entries

    def remove(self, model_id: str) -> bool:
        """Deletes a downloaded model (and any partial download); False when there was none.

        Bundled models belong to their packages and are left alone.
        """
        _check_model_id(model_id)
        if model_id in self._downloads:
            raise ModelStoreError(
                f"model {model_id!r} is being downloaded; wait for it or stop it first",
                code="DOWNLOAD_IN_PROGRESS",
            )
        directory = self.cache_dir / model_id
        if not directory.is_dir():
            return False
        shutil.rmtree(directory)
        return True

    # -- downloading ---------------------------------------------------------------------

    async def pull(
        self,
        model: str | CatalogModel,
        artifact: Artifact | None = None,
        *,
        progress: ProgressCallback | None = None,
        attempts: int = 1,
    ) -> Path:
        """Downloads ``artifact`` (default: the catalog's) into the cache; returns its path.

        A verified copy already in the cache is returned without a request. A
        dropped connection leaves the ``.part`` file, and the next attempt (up to
        ``attempts`` in this call, or a later pull) resumes it. Concurrent pulls of
        one model share one download.
        """
        model_id = model if isinstance(model, str) else model.id
        _check_model_id(model_id)
        if artifact is None:
            artifact = model.artifact if isinstance(model, CatalogModel) else None
            if artifact is None:
                artifact = self.artifact_for(model_id)
        if artifact is None or not artifact.url:
            raise ModelStoreError(
                f"model {model_id!r} has no download URL in the catalog; "
                "give one with --url (and --sha256 to verify it)",
                code="NO_ARTIFACT",
            )
        _check_filename(artifact.filename)

        download = self._downloads.get(model_id)
        if download is None:
            download = _Download(artifact)
            task = asyncio.create_task(self._download(model_id, artifact, download, attempts))
            download.task = task
            self._downloads[model_id] = download
            task.add_done_callback(lambda done: self._forget(model_id, done))
        elif download.artifact != artifact:
            raise ModelStoreError(
                f"model {model_id!r} is already being downloaded from another artifact",
                code="DOWNLOAD_IN_PROGRESS",
            )
        assert download.task is not None
        task = download.task
        if progress is not None:
            download.listeners.append(progress)
        download.waiters += 1
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and not (current is not None and current.cancelling()):
                raise ModelStoreError(
                    f"the download of {model_id!r} was stopped (the store closed)",
                    code="DOWNLOAD_FAILED",
                ) from None
            raise
        finally:
            download.waiters -= 1
            if progress is not None:
                download.listeners.remove(progress)
            if download.waiters == 0 and not task.done():
                # The last one waiting went away: stop, and let the part file close.
                task.cancel()
                await asyncio.wait([task])

    def _forget(self, model_id: str, task: asyncio.Task[Path]) -> None:
        download = self._downloads.get(model_id)
        if download is not None and download.task is task:
            del self._downloads[model_id]
        if not task.cancelled():
            task.exception()  # retrieved here, so a pull nobody awaits is not reported

    async def _download(
        self, model_id: str, artifact: Artifact, download: _Download, attempts: int
    ) -> Path:
        directory = self.cache_dir / model_id
        final = directory / artifact.filename
        part = directory / (artifact.filename + PART_SUFFIX)
        existing = await asyncio.to_thread(self._already_pulled, model_id, artifact)
        if existing is not None:
            return existing
        await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
        for attempt in range(1, max(1, attempts) + 1):
            try:
                digest, size = await self._fetch_with_restart(model_id, artifact, part, download)
                break
            except ModelStoreError as exc:
                if attempt >= attempts or not _retryable(exc):
                    raise
                log.warning(
                    "download of %s interrupted (%s); resuming, attempt %d of %d",
                    model_id,
                    exc.message,
                    attempt + 1,
                    attempts,
                )
                await asyncio.sleep(_RETRY_DELAY_S * attempt)
        return await asyncio.to_thread(
            _commit, model_id, artifact, part, final, digest.hexdigest(), size
        )

    async def _fetch_with_restart(
        self, model_id: str, artifact: Artifact, part: Path, download: _Download
    ) -> tuple[hashlib._Hash, int]:
        try:
            return await self._fetch(model_id, artifact, part, download)
        except _Restart as exc:
            log.info("discarding the partial download of %s: %s", model_id, exc)
            await asyncio.to_thread(part.unlink, missing_ok=True)
        try:
            return await self._fetch(model_id, artifact, part, download)
        except _Restart as exc:
            raise ModelStoreError(
                f"download of {model_id!r} failed: {exc}", code="DOWNLOAD_FAILED"
            ) from None

    async def _fetch(
        self, model_id: str, artifact: Artifact, part: Path, download: _Download
    ) -> tuple[hashlib._Hash, int]:
        """Brings ``part`` up to the whole file; returns its running digest and size."""
        assert artifact.url is not None
        expected = artifact.size_bytes
        digest = hashlib.sha256()
        offset = await asyncio.to_thread(_hash_existing, part, digest, expected)
        await asyncio.to_thread(
            self._check_disk, model_id, part.parent, None if expected is None else expected - offset
        )
        if expected is not None and offset == expected:
            return digest, offset  # the part is whole: only verification is left
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        where = _display_url(artifact.url)
        try:
            async with self._http().stream("GET", artifact.url, headers=headers) as response:
                status = response.status_code
                if offset and status == 416:
                    total = _parse_content_range(response.headers.get("content-range"))[2]
                    if total == offset or (total is None and expected is None):
                        return digest, offset  # we had it all already
                    raise _Restart(f"the server's file is {total} bytes, our part {offset}")
                if offset and status == 206:
                    start, _, _ = _parse_content_range(response.headers.get("content-range"))
                    if start != offset:
                        raise _Restart(f"asked for bytes from {offset}, got from {start}")
                    mode = "ab"
                elif status == 200:
                    if offset:
                        log.info("%s ignored the range request; starting %s over", where, model_id)
                        await asyncio.to_thread(self._check_disk, model_id, part.parent, expected)
                    offset, digest, mode = 0, hashlib.sha256(), "wb"
                else:
                    raise ModelStoreError(
                        f"download of {model_id!r} failed: HTTP {status} from {where}",
                        code="DOWNLOAD_FAILED",
                    )
                length = _content_length(response)
                total = expected if expected is not None else _plus(offset, length)
                if expected is not None and length is not None and offset + length != expected:
                    if offset:
                        raise _Restart(f"the server's file does not end at {expected} bytes")
                    raise ModelStoreError(
                        f"download of {model_id!r} failed: {where} offers {length} bytes, "
                        f"expected {expected}",
                        code="DOWNLOAD_FAILED",
                    )
                if expected is None and length is not None:
                    await asyncio.to_thread(self._check_disk, model_id, part.parent, length)
                file = await asyncio.to_thread(_open_part, part, mode)
                try:
                    download.notify(offset, total)
                    async for chunk in response.aiter_bytes(_CHUNK_BYTES):
                        if expected is not None and offset + len(chunk) > expected:
                            raise _TooLong(expected)
                        await _in_thread(_append, file, digest, chunk)
                        offset += len(chunk)
                        download.notify(offset, total)
                    await _in_thread(_flush_and_sync, file)
                finally:
                    await _in_thread(file.close)
        except _TooLong as exc:
            await asyncio.to_thread(part.unlink, missing_ok=True)
            raise ModelStoreError(
                f"download of {model_id!r} rejected: {where} sent more than the expected "
                f"{exc.expected} bytes; the partial download was removed",
                code="CHECKSUM_MISMATCH",
            ) from None
        except httpx.HTTPError as exc:
            raise ModelStoreError(
                f"download of {model_id!r} from {where} failed: {type(exc).__name__}: {exc}",
                code="DOWNLOAD_FAILED",
            ) from exc
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise ModelStoreError(
                    f"the disk filled up while downloading {model_id!r} into {part.parent}; "
                    "free some space and pull again to resume",
                    code="DISK_FULL",
                ) from exc
            raise ModelStoreError(
                f"cannot write the download of {model_id!r} to {part}: {exc}",
                code="DOWNLOAD_FAILED",
            ) from exc
        if expected is not None and offset < expected:
            raise ModelStoreError(
                f"download of {model_id!r} from {where} ended after {offset} of {expected} "
                "bytes; pull again to resume",
                code="DOWNLOAD_FAILED",
            )
        return digest, offset

    def _check_disk(self, model_id: str, directory: Path, needed: int | None) -> None:
        if needed is None:
            return
        free = shutil.disk_usage(directory).free
        if free < needed + self.disk_margin_bytes:
            raise ModelStoreError(
                f"not enough disk space to download {model_id!r}: it needs "
                f"{format_bytes(needed)} plus {format_bytes(self.disk_margin_bytes)} to spare, "
                f"and {directory} has {format_bytes(free)} free",
                code="DISK_FULL",
            )

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=self._timeout,
                follow_redirects=True,  # model hubs redirect to their CDNs
                limits=httpx.Limits(max_connections=8, max_keepalive_connections=4),
                headers={"User-Agent": f"swarmgate/{__version__}"},
            )
        return self._client

    # -- verification --------------------------------------------------------------------

    def _expected_in_cache(self, model_id: str) -> tuple[str, str, int | None] | None:
        """(filename, sha256, size) a cached download of ``model_id`` must have."""
        manifest = _read_manifest(self.cache_dir / model_id)
        if manifest is not None:
            return manifest["filename"], manifest["sha256"], manifest["size_bytes"]
        artifact = self.artifact_for(model_id)  # a file put there by hand
        if artifact is None or artifact.sha256 is None:
            return None
        return artifact.filename, artifact.sha256, artifact.size_bytes

    def _already_pulled(self, model_id: str, artifact: Artifact) -> Path | None:
        sha256 = artifact.sha256
        if sha256 is None:
            # No published digest: trust the one we recorded for this same URL and file.
            manifest = _read_manifest(self.cache_dir / model_id)
            if manifest is None or (manifest["url"], manifest["filename"]) != (
                artifact.url,
                artifact.filename,
            ):
                return None
            sha256 = manifest["sha256"]
        path = self.cache_dir / model_id / artifact.filename
        return self._verified(path, sha256, artifact.size_bytes)

    def _verified(self, path: Path, sha256: str, size: int | None) -> Path | None:
        try:
            if not path.is_file() or (size is not None and path.stat().st_size != size):
                return None
            actual = cached_sha256(path, self.cache_dir)
        except OSError as exc:
            log.warning("cannot read %s: %s", path, exc)
            return None
        if actual != sha256:
            log.warning("%s has sha256 %s, expected %s; ignoring it", path, actual, sha256)
            return None
        return path

    def _bundled_entry(self, model_id: str) -> StoredModel | None:
        model = BUNDLED_MODELS[model_id]
        paths = [find_distribution_file(part) for part in model.parts]
        found = [path for path in paths if path is not None]
        if len(found) != len(paths):
            return None
        # Chunked models are assembled into the cache on first use.
        path = self.cache_dir / model.filename if model.chunked else found[0]
        size = sum(chunk.stat().st_size for chunk in found)
        return StoredModel(model_id, path, size, model.sha256, "bundled")


class _TooLong(Exception):
    def __init__(self, expected: int) -> None:
        super().__init__(expected)
        self.expected = expected


def _retryable(exc: ModelStoreError) -> bool:
    # A dropped or timed-out connection is worth resuming; an HTTP 404 is not.
    return exc.code == "DOWNLOAD_FAILED" and isinstance(exc.__cause__, httpx.TransportError)


def _check_model_id(model_id: str) -> None:
    if not _MODEL_ID.match(model_id):
        raise ModelStoreError(
            f"{model_id!r} is not a model id (letters, digits, '.', '_' and '-')",
            code="INVALID_MODEL_ID",
        )


def _check_filename(filename: str) -> None:
    if not _FILENAME.match(filename) or filename.endswith(PART_SUFFIX) or filename == MANIFEST_NAME:
        raise ModelStoreError(
            f"{filename!r} is not a usable file name for a model", code="INVALID_MODEL_ID"
        )


def filename_from_url(url: str, fallback: str) -> str:
    """The last path segment of ``url`` when it makes a safe file name, else ``fallback``."""
    name = urlsplit(url).path.rsplit("/", 1)[-1]
    try:
        _check_filename(name)
    except ModelStoreError:
        return fallback
    return name


def _display_url(url: str) -> str:
    # Signed CDN URLs carry credentials in the query: never print it.
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.hostname or "", parts.path, "", ""))


def _parse_content_range(value: str | None) -> tuple[int | None, int | None, int | None]:
    match = _CONTENT_RANGE.match(value.strip()) if value else None
    if match is None:
        return None, None, None
    start, end, total = match.groups()
    return (
        int(start) if start is not None else None,
        int(end) if end is not None else None,
        int(total) if total != "*" else None,
    )


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length")
    return int(value) if value is not None and value.isdigit() else None


def _plus(offset: int, length: int | None) -> int | None:
    return None if length is None else offset + length


async def _in_thread(func: Callable[..., T], *args: Any) -> T:
    """``to_thread``, except that a cancelled caller still waits for the thread: the part
    file is never closed under a write in progress."""
    work = asyncio.ensure_future(asyncio.to_thread(func, *args))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await work
        raise


# -- blocking file work (worker threads) ----------------------------------------------------


def _hash_existing(part: Path, digest: hashlib._Hash, expected: int | None) -> int:
    """Feeds an existing part into ``digest``; returns its size (0: none, or unusable)."""
    try:
        size = part.stat().st_size
    except FileNotFoundError:
        return 0
    if expected is not None and size > expected:
        part.unlink(missing_ok=True)  # longer than the whole file: not ours to resume
        return 0
    hashed = 0
    with part.open("rb") as file:
        while block := file.read(_HASH_BLOCK):
            digest.update(block)
            hashed += len(block)
    return hashed


def _open_part(part: Path, mode: str) -> BinaryIO:
    return part.open(mode)  # type: ignore[return-value]


def _append(file: BinaryIO, digest: hashlib._Hash, chunk: bytes) -> None:
    file.write(chunk)
    digest.update(chunk)


def _flush_and_sync(file: BinaryIO) -> None:
    file.flush()
    os.fsync(file.fileno())


def _commit(
    model_id: str, artifact: Artifact, part: Path, final: Path, sha256: str, size: int
) -> Path:
    """Checks the finished part and renames it into place, or removes it."""
    if artifact.size_bytes is not None and size != artifact.size_bytes:
        part.unlink(missing_ok=True)
        raise ModelStoreError(
            f"download of {model_id!r} rejected: {size} bytes, expected "
            f"{artifact.size_bytes}; the partial download was removed",
            code="CHECKSUM_MISMATCH",
        )
    if artifact.sha256 is not None and sha256 != artifact.sha256:
        part.unlink(missing_ok=True)
        raise ModelStoreError(
            f"download of {model_id!r} rejected: sha256 {sha256} does not match the "
            f"expected {artifact.sha256}; the partial download was removed",
            code="CHECKSUM_MISMATCH",
        )
    if artifact.sha256 is None:
        log.warning("%s has no published sha256; recorded %s as downloaded", model_id, sha256)
    # The manifest goes first: a crash between the two renames leaves a manifest whose
    # file is missing or fails its digest, never a file trusted without a check.
    _write_manifest(
        final.parent,
        {
            "id": model_id,
            "filename": artifact.filename,
            "url": artifact.url,
            "sha256": sha256,
            "size_bytes": size,
        },
    )
    os.replace(part, final)
    _fsync_directory(final.parent)
    return final


def _write_manifest(directory: Path, payload: dict[str, Any]) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=".artifact-", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(payload, out, indent=1, sort_keys=True)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp_name, directory / MANIFEST_NAME)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _read_manifest(directory: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((directory / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    filename, sha256, size = data.get("filename"), data.get("sha256"), data.get("size_bytes")
    if not (isinstance(filename, str) and isinstance(sha256, str)):
        return None
    try:
        _check_filename(filename)
    except ModelStoreError:
        return None
    return {
        "filename": filename,
        "sha256": sha256,
        "size_bytes": size if isinstance(size, int) else None,
        "url": data.get("url"),
    }


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; directories cannot be opened this way on Windows.
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = [
    "DISK_MARGIN_BYTES",
    "ModelStore",
    "ProgressCallback",
    "StoredModel",
    "filename_from_url",
]
