"""``swarmgate node models pull|list|remove``: the GGUFs this device can serve.

``--json`` prints exactly one JSON object on stdout (errors included); progress and
messages go to stderr. ``local_model_paths`` is what ``swarmgate node`` calls before
starting the llama-cpp backend.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import orjson

from swarmgate.catalog import Artifact, Catalog
from swarmgate.config import NodeSettings
from swarmgate.errors import ModelStoreError
from swarmgate.node.progress import DownloadProgress, format_bytes
from swarmgate.node.store import ModelStore, StoredModel, filename_from_url

if TYPE_CHECKING:
    from swarmgate.node.agent import NodeAgent

log = logging.getLogger("swarmgate.node")

# Resumes after a dropped connection before a pull gives up.
PULL_ATTEMPTS = 3


def add_models_parser(node_commands: Any) -> None:
    """Adds ``models`` to the subcommands of ``swarmgate node`` (an add_subparsers action)."""
    models = node_commands.add_parser("models", help="download, list and remove this node's GGUFs")
    actions = models.add_subparsers(dest="models_command", required=True)

    pull = actions.add_parser("pull", help="download a model into the cache and verify it")
    pull.add_argument("model_id", metavar="MODEL", help="catalog model id")
    pull.add_argument("--url", help="download from here instead of the catalog's artifact")
    pull.add_argument("--sha256", help="expected sha256 (hex) of the file")
    pull.add_argument("--size", type=int, help="expected size of the file in bytes")

    actions.add_parser("list", help="bundled and downloaded models")

    remove = actions.add_parser("remove", help="delete a downloaded model")
    remove.add_argument("model_id", metavar="MODEL")

    for action in (pull, actions.choices["list"], remove):
        action.add_argument(
            "--cache-dir",
            type=Path,
            # SUPPRESS: an unset flag here must not hide one given to `swarmgate node`.
            default=argparse.SUPPRESS,
            help="where downloads live (SWARMGATE_NODE_CACHE_DIR, default ~/.swarmgate/models)",
        )
        action.add_argument("--json", action="store_true", help="print one JSON object")


def run_models(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    if getattr(args, "cache_dir", None) is not None:
        overrides["cache_dir"] = args.cache_dir
    settings = NodeSettings(**overrides)
    command = {"pull": _pull, "list": _list, "remove": _remove}[args.models_command]
    try:
        result = asyncio.run(command(settings.cache_dir, args))
    except ModelStoreError as exc:
        if args.json:
            sys.stdout.write(orjson.dumps(exc.to_dict()).decode() + "\n")
        else:
            print(f"swarmgate node models: {exc.message}", file=sys.stderr)
        return 1
    if args.json:
        sys.stdout.write(orjson.dumps(result).decode() + "\n")
    else:
        _print_human(args.models_command, result)
    return 0


async def _pull(cache_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    async with ModelStore(cache_dir) as store:
        artifact = _requested_artifact(store, args)
        if artifact is None:
            path = await asyncio.to_thread(store.resolve, args.model_id)
            if path is not None:
                entry = await asyncio.to_thread(_entry_for, store, args.model_id, path)
                return {**entry.to_dict(), "downloaded": False}
        path = await pull_with_progress(store, args.model_id, artifact)
        entry = await asyncio.to_thread(_entry_for, store, args.model_id, path)
        return {**entry.to_dict(), "downloaded": True}


async def _list(cache_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    async with ModelStore(cache_dir) as store:
        entries = await asyncio.to_thread(store.list)
    return {
        "object": "list",
        "cache_dir": str(store.cache_dir),
        "data": [entry.to_dict() for entry in entries],
    }


async def _remove(cache_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    async with ModelStore(cache_dir) as store:
        removed = await asyncio.to_thread(store.remove, args.model_id)
        entries = [] if removed else await asyncio.to_thread(store.list)
    if not removed:
        bundled = any(e.id == args.model_id and e.source == "bundled" for e in entries)
        reason = "is bundled with an installed package" if bundled else "is not downloaded"
        raise ModelStoreError(
            f"model {args.model_id!r} {reason}; nothing removed from {store.cache_dir}",
            code="NOT_IN_CACHE",
        )
    return {"id": args.model_id, "removed": True, "cache_dir": str(store.cache_dir)}


def _requested_artifact(store: ModelStore, args: argparse.Namespace) -> Artifact | None:
    """The artifact the flags describe, or None to take the catalog's as it is."""
    if args.url is None and args.sha256 is None and args.size is None:
        return None
    base = store.artifact_for(args.model_id)
    url = args.url or (base.url if base else None)
    if url is None:
        raise ModelStoreError(
            f"model {args.model_id!r} has no download URL in the catalog; give one with --url",
            code="NO_ARTIFACT",
        )
    if base is not None and args.url is None:
        filename = base.filename
    else:
        fallback = base.filename if base else f"{args.model_id}.gguf"
        filename = filename_from_url(url, fallback)
    try:
        return Artifact(
            filename=filename,
            url=url,
            sha256=args.sha256.lower() if args.sha256 else (base.sha256 if base else None),
            size_bytes=args.size if args.size is not None else (base.size_bytes if base else None),
        )
    except ValueError as exc:
        raise ModelStoreError(
            "--sha256 must be 64 hexadecimal digits", code="INVALID_ARTIFACT"
        ) from exc


def _entry_for(store: ModelStore, model_id: str, path: Path) -> StoredModel:
    for entry in store.list():
        if entry.id == model_id and entry.path == path:
            return entry
    return StoredModel(model_id, path, path.stat().st_size, None, "cache")


async def pull_with_progress(
    store: ModelStore,
    model_id: str,
    artifact: Artifact | None = None,
    stream: TextIO | None = None,
) -> Path:
    """``store.pull`` with a progress display on ``stream`` (stderr by default)."""
    progress = DownloadProgress(model_id, stream)
    try:
        return await store.pull(model_id, artifact, progress=progress, attempts=PULL_ATTEMPTS)
    finally:
        progress.finish()


async def local_model_paths(
    model_ids: list[str],
    cache_dir: Path,
    *,
    catalog: Catalog | None = None,
    stream: TextIO | None = None,
) -> dict[str, str]:
    """A GGUF path for each model: bundled, already downloaded, or downloaded now.

    Raises ``ModelStoreError`` when a model is missing and cannot be downloaded.
    """
    out = stream if stream is not None else sys.stderr
    ready, missing = await split_local_and_missing(model_ids, cache_dir, catalog=catalog)
    if missing:
        async with ModelStore(cache_dir, catalog=catalog) as store:
            for model_id in missing:
                print(f"swarmgate node: downloading {model_id} into {store.cache_dir}", file=out)
                ready[model_id] = str(await pull_with_progress(store, model_id, stream=out))
    return {model_id: ready[model_id] for model_id in model_ids}


async def split_local_and_missing(
    model_ids: list[str], cache_dir: Path, *, catalog: Catalog | None = None
) -> tuple[dict[str, str], list[str]]:
    """Paths of the models already here, and the ids that must be downloaded first.

    Raises ``ModelStoreError`` for a missing model the catalog gives no URL for, so a node
    refuses to start rather than announce something it can never serve.
    """
    ready: dict[str, str] = {}
    missing: list[str] = []
    async with ModelStore(cache_dir, catalog=catalog) as store:
        for model_id in model_ids:
            path = await asyncio.to_thread(store.resolve, model_id)
            if path is not None:
                ready[model_id] = str(path)
                continue
            artifact = store.artifact_for(model_id)
            if artifact is None or not artifact.url:
                raise ModelStoreError(
                    f"model {model_id!r} is not installed and the catalog has no download "
                    f"URL for it; fetch it with `swarmgate node models pull {model_id} "
                    "--url URL --sha256 HEX`",
                    code="NO_ARTIFACT",
                )
            missing.append(model_id)
    return ready, missing


async def download_while_serving(
    agent: NodeAgent,
    backend_paths: dict[str, str],
    model_ids: list[str],
    cache_dir: Path,
    *,
    catalog: Catalog | None = None,
) -> None:
    """Downloads models while the node is already connected: the gateway sees them as
    warming (with progress) and routes to them the moment they are loaded."""
    for model_id in model_ids:
        agent.warming[model_id] = 0.0
    async with ModelStore(cache_dir, catalog=catalog) as store:
        for model_id in model_ids:

            def progress(done: int, total: int | None, model_id: str = model_id) -> None:
                agent.warming[model_id] = (done / total) if total else None

            try:
                path = await store.pull(model_id, progress=progress, attempts=3)
            except ModelStoreError as exc:
                agent.warming.pop(model_id, None)
                log.error("could not download %s: %s", model_id, exc.message)
                continue
            backend_paths[model_id] = str(path)
            await agent.add_models([model_id])
            log.info("%s is downloaded and serving", model_id)


def _print_human(command: str, result: dict[str, Any]) -> None:
    if command == "list":
        if not result["data"]:
            print(f"no models (cache: {result['cache_dir']})")
        for entry in result["data"]:
            size = format_bytes(entry["size_bytes"])
            print(f"{entry['id']:40} {entry['source']:8} {size:>10}  {entry['path']}")
    elif command == "pull":
        print(result["path"])
    else:
        print(f"removed {result['id']}")


__all__ = ["add_models_parser", "local_model_paths", "pull_with_progress", "run_models"]
