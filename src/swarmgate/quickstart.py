"""``swarmgate up``: a gateway on SQLite plus one local device, ready to call, in one command."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import uvicorn

from swarmgate.accounts import service
from swarmgate.api.app import create_asgi_app
from swarmgate.config import GatewaySettings
from swarmgate.gateway import Gateway
from swarmgate.node.agent import NodeAgent
from swarmgate.node.backends.base import create_backend
from swarmgate.store.db import create_engine, migrate

log = logging.getLogger("swarmgate.up")
WELCOME_CREDIT_MICROS = 5_000_000  # $5


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: ``up`` stops the device first, then it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _load_credentials(path: Path) -> dict[str, Any]:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        return dict(orjson.loads(path.read_bytes()))
    return {}


def _save_credentials(path: Path, creds: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(orjson.dumps(creds, option=orjson.OPT_INDENT_2))
    tmp.replace(path)


async def ensure_accounts(settings: GatewaySettings, creds: dict[str, Any]) -> dict[str, Any]:
    """Creates the local developer and provider accounts once; later runs reuse them."""
    engine = create_engine(settings.database_url)
    try:
        await migrate(engine)
        known = {a["id"] for a in await service.list_accounts(engine)}
        if creds.get("developer_account_id") not in known:
            account = await service.create_account(
                engine, name="local developer", credit_micros=WELCOME_CREDIT_MICROS
            )
            key = await service.create_api_key(engine, account_id=account["id"], name="quickstart")
            creds.update(developer_account_id=account["id"], api_key=key.secret)
        if creds.get("provider_account_id") not in known:
            provider = await service.create_account(
                engine, name="local provider", developer=False, provider=True
            )
            device = await service.create_device(
                engine, account_id=provider["id"], name="this machine"
            )
            creds.update(
                provider_account_id=provider["id"], device_token=device.secret, device_id=device.id
            )
    finally:
        await engine.dispose()
    return creds


def banner(base_url: str, api_key: str, model: str) -> str:
    return f"""
Swarmgate is up: a gateway with one local device serving {model}.

  Base URL : {base_url}/v1
  API key  : {api_key}
  Docs     : {base_url}/docs
  Dashboard: {base_url}/dashboard/  (sign up there for your own account and keys)

Try it:

  curl {base_url}/v1/chat/completions \\
    -H "Authorization: Bearer {api_key}" \\
    -H "Content-Type: application/json" \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Say hello"}}]}}'

  from openai import OpenAI
  client = OpenAI(base_url="{base_url}/v1", api_key="{api_key}")
  reply = client.chat.completions.create(
      model="{model}", messages=[{{"role": "user", "content": "Say hello"}}])
  print(reply.choices[0].message.content)

Press Ctrl-C to stop.
"""


async def run_quickstart(*, data_dir: Path, host: str, port: int, backend: str, model: str) -> int:
    from swarmgate.cli import _stop_event, uvicorn_config

    creds_path = data_dir / "credentials.json"
    creds = await asyncio.to_thread(_load_credentials, creds_path)
    creds.setdefault("admin_token", secrets.token_urlsafe(32))
    settings = GatewaySettings(
        data_dir=data_dir, host=host, port=port, admin_token=creds["admin_token"]
    )
    creds = await ensure_accounts(settings, creds)
    await asyncio.to_thread(_save_credentials, creds_path, creds)

    stop = _stop_event()
    try:
        device_backend = create_backend(backend, **({"slots": 1} if backend == "llama-cpp" else {}))
    except ImportError as exc:
        print(
            f"swarmgate up: the {backend} backend is not installed ({exc}). "
            "Install with: pip install 'swarmgate[llama]'",
            file=sys.stderr,
        )
        return 1

    app = create_asgi_app(settings, Gateway(settings))
    server = _Server(uvicorn_config(app, settings))
    server_task = asyncio.create_task(server.serve())
    while not server.started:
        if server_task.done():
            print(f"swarmgate up: the gateway could not start on {host}:{port}", file=sys.stderr)
            return 1
        await asyncio.sleep(0.05)

    base_url = f"http://{host}:{port}"
    agent = NodeAgent(
        gateway_url=f"ws://{host}:{port}/v1/nodes/connect",
        token=creds["device_token"],
        backend=device_backend,
        models=[model],
        region="local",
    )
    agent_task = asyncio.create_task(agent.run(stop))
    connected = asyncio.create_task(agent.connected.wait())
    await asyncio.wait({agent_task, connected}, return_when=asyncio.FIRST_COMPLETED)
    if agent_task.done():
        connected.cancel()
        server.should_exit = True
        await server_task
        error = agent_task.exception()
        print(f"swarmgate up: the local device could not start: {error}", file=sys.stderr)
        return 1
    print(banner(base_url, creds["api_key"], model), flush=True)

    await stop.wait()
    print("Stopping: finishing running jobs…", flush=True)
    await agent_task
    server.should_exit = True
    await server_task
    print("Stopped.", flush=True)
    return 0
