"""The node's saved registration: which gateway it serves and the device token it uses.

``swarmgate node register`` (or ``login``) writes it to ``~/.swarmgate/node.json`` with mode
0600; ``swarmgate node`` reads it when no token is given by flag or environment. A flag or
``SWARMGATE_NODE_*`` variable always wins over the file.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from swarmgate.config import NodeSettings, default_data_dir

log = logging.getLogger("swarmgate.node")

CONNECT_PATH = "/v1/nodes/connect"


class RegistrationError(Exception):
    """The saved registration cannot be read or written; the message says what to do."""


@dataclass(frozen=True)
class NodeRegistration:
    gateway_url: str  # ws(s)://host/v1/nodes/connect
    api_url: str  # http(s)://host, for the admin API
    token: str
    device_id: str
    account_id: str
    name: str = ""
    created_at: str = ""


def default_registration_path() -> Path:
    return default_data_dir() / "node.json"


def registration_path(settings: NodeSettings | None = None) -> Path:
    configured = settings.config_path if settings is not None else None
    return (configured or default_registration_path()).expanduser()


def gateway_urls(url: str) -> tuple[str, str]:
    """Any spelling of a gateway's address → (its HTTP base URL, its node WebSocket URL).

    ``http://h:8080``, ``https://h/prefix`` and ``ws://h:8080/v1/nodes/connect`` all work.
    """
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https", "ws", "wss") or not parts.netloc:
        raise ValueError(f"not a gateway URL: {url!r} (expected e.g. https://gateway.example)")
    secure = parts.scheme in ("https", "wss")
    prefix = parts.path.rstrip("/")
    prefix = prefix.removesuffix(CONNECT_PATH)
    http = f"{'https' if secure else 'http'}://{parts.netloc}{prefix}"
    return http, f"{'wss' if secure else 'ws'}://{parts.netloc}{prefix}{CONNECT_PATH}"


def save_registration(registration: NodeRegistration, path: Path) -> None:
    """Writes atomically, readable by the owner only (it holds the device token)."""
    path = path.expanduser()
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to a leftover file
            os.write(fd, orjson.dumps(dataclasses.asdict(registration), option=orjson.OPT_INDENT_2))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(partial, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise RegistrationError(f"cannot save the registration to {path}: {exc}") from exc


def load_registration(path: Path) -> NodeRegistration | None:
    """The saved registration, or None if there is none."""
    path = path.expanduser()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RegistrationError(f"cannot read {path}: {exc}") from exc
    with contextlib.suppress(OSError):
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            log.warning("%s holds a device token but others can read it: chmod 600 it", path)
    try:
        data: Any = orjson.loads(raw)
        fields = {f.name for f in dataclasses.fields(NodeRegistration)}
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
        return NodeRegistration(**{k: v for k, v in data.items() if k in fields})
    except (orjson.JSONDecodeError, TypeError) as exc:
        raise RegistrationError(
            f"{path} is not a node registration ({exc}); "
            "run `swarmgate node register --force` to replace it"
        ) from exc


def apply_registration(settings: NodeSettings) -> NodeSettings:
    """Fills in the token (and gateway, unless set) from the saved registration."""
    if settings.token:
        return settings
    saved = load_registration(registration_path(settings))
    if saved is None:
        return settings
    update: dict[str, Any] = {"token": saved.token}
    if "gateway_url" not in settings.model_fields_set:
        update["gateway_url"] = saved.gateway_url
    return settings.model_copy(update=update)
