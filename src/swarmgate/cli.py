"""The ``swarmgate`` command: serve, node, up, simulate and admin."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import secrets
import signal
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

import orjson

from swarmgate import __version__
from swarmgate.config import GatewaySettings, NodeSettings, default_data_dir
from swarmgate.logs import configure_logging


def _add_gateway_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="address to listen on (SWARMGATE_HOST)")
    parser.add_argument("--port", type=int, help="port to listen on (SWARMGATE_PORT)")
    parser.add_argument("--data-dir", type=Path, help="where the SQLite database lives")
    parser.add_argument("--database-url", help="SQLAlchemy URL (SWARMGATE_DATABASE_URL)")


def gateway_settings(args: argparse.Namespace) -> GatewaySettings:
    overrides: dict[str, Any] = {}
    for name in ("host", "port", "data_dir", "database_url"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    return GatewaySettings(**overrides)


def uvicorn_config(app: Any, settings: GatewaySettings) -> Any:
    import uvicorn

    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop" if sys.platform != "win32" else "asyncio",
        http="httptools",
        ws="websockets-sansio",
        ws_max_size=settings.max_frame_bytes,
        # Device frames are small and latency-bound: compressing each costs more than it saves.
        ws_per_message_deflate=False,
        access_log=False,
        log_config=None,
        proxy_headers=settings.proxy_headers,
        timeout_graceful_shutdown=10,
    )


def run_fast(main: Coroutine[Any, Any, int]) -> int:
    """asyncio.run on uvloop where it exists: long-running processes (node, simulate, up)
    spend most of their time in the event loop."""
    try:
        import uvloop
    except ImportError:  # Windows, or a platform without a wheel
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def tune_gc_for_serving() -> None:
    """Everything imported so far lives as long as the process: freeze it out of the cyclic
    collector, and collect young objects less often (each request makes many short-lived
    ones; measured in BENCHMARKS.md)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


# -- serve -------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from swarmgate.api.app import create_asgi_app

    settings = gateway_settings(args)
    server = uvicorn.Server(uvicorn_config(create_asgi_app(settings), settings))
    tune_gc_for_serving()
    server.run()
    return 0


# -- node --------------------------------------------------------------------------------
def _add_sim_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sim backend")
    group.add_argument("--sim-ttft-ms", type=float, default=0.0)
    group.add_argument("--sim-tokens-per-s", type=float, default=0.0)
    group.add_argument("--sim-length", type=int, default=24)
    group.add_argument("--sim-fail-rate", type=float, default=0.0)
    group.add_argument("--sim-die-after", type=int, default=None)
    group.add_argument("--sim-hang", action="store_true")
    group.add_argument(
        "--sim-serve-as",
        metavar="MODEL",
        help="a liar: claim the requested model but answer as this one (tests canaries)",
    )


def _sim_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "ttft_ms": args.sim_ttft_ms,
        "tokens_per_s": args.sim_tokens_per_s,
        "length": args.sim_length,
        "fail_rate": args.sim_fail_rate,
        "die_after_tokens": args.sim_die_after,
        "hang": args.sim_hang,
        "serve_as": args.sim_serve_as,
    }


def _backend_options(args: argparse.Namespace, settings: NodeSettings) -> dict[str, Any]:
    if settings.backend == "sim":
        return _sim_options(args)
    if settings.backend == "llama-cpp":
        return {
            "n_ctx": settings.n_ctx,
            "n_threads": settings.n_threads,
            "slots": settings.slots,
            "cache_dir": str(settings.cache_dir.expanduser()),
        }
    if settings.backend == "openai-http":
        return {"base_url": settings.openai_base_url, "api_key": settings.openai_api_key}
    return {}


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    return stop


def cmd_node(args: argparse.Namespace) -> int:
    # `swarmgate node <subcommand>`; with none, run the node.
    if getattr(args, "node_command", None) == "models":
        from swarmgate.node.models_cli import run_models

        return run_models(args)

    from swarmgate.node.agent import FatalConnectionError, NodeAgent
    from swarmgate.node.backends.base import create_backend
    from swarmgate.node.provider_cli import NODE_RUN_SETTINGS, ProviderCommandError, prepare_node

    overrides: dict[str, Any] = {}
    for name in ("gateway_url", "token", "backend", "region", "slots", "cache_dir"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    if args.model:
        overrides["models"] = args.model
    for name in NODE_RUN_SETTINGS:  # the device guard, and where the saved token is
        if getattr(args, name, None) is not None:
            overrides[name] = getattr(args, name)
    try:
        settings, guard = prepare_node(NodeSettings(**overrides))
    except ProviderCommandError as exc:
        print(f"swarmgate node: {exc}", file=sys.stderr)
        return exc.exit_code
    if not settings.token:
        print(
            "swarmgate node: a device token is needed "
            "(--token, SWARMGATE_NODE_TOKEN or `swarmgate node register`)",
            file=sys.stderr,
        )
        return 2

    async def main() -> int:
        options = _backend_options(args, settings)
        models: list[str] = list(settings.models)
        missing: list[str] = []
        if settings.backend == "llama-cpp":
            from swarmgate.errors import ModelStoreError
            from swarmgate.node.models_cli import split_local_and_missing

            # Bundled or already downloaded GGUFs serve at once; the rest download while
            # the node is connected, reported to the gateway as warming.
            try:
                ready, missing = await split_local_and_missing(settings.models, settings.cache_dir)
            except ModelStoreError as exc:
                print(f"swarmgate node: {exc.message}", file=sys.stderr)
                return 1
            options["model_paths"] = ready
            models = list(ready)
        backend = create_backend(settings.backend, **options)
        agent = NodeAgent(
            gateway_url=settings.gateway_url,
            token=settings.token,
            backend=backend,
            models=models,
            slots=settings.slots,
            region=settings.region,
            reconnect_min_s=settings.reconnect_min_s,
            reconnect_max_s=settings.reconnect_max_s,
            drain_timeout_s=settings.drain_timeout_s,
            guard=guard,
        )
        downloads = None
        if missing:
            from swarmgate.node.backends.llama_cpp import LlamaCppBackend
            from swarmgate.node.models_cli import download_while_serving

            assert isinstance(backend, LlamaCppBackend)  # only llama-cpp downloads models
            downloads = asyncio.create_task(
                download_while_serving(agent, backend.model_paths, missing, settings.cache_dir)
            )
        try:
            await agent.run(_stop_event())
        except FatalConnectionError as exc:
            print(f"swarmgate node: {exc}", file=sys.stderr)
            return 1
        finally:
            if downloads is not None:
                downloads.cancel()  # an unfinished download keeps its .part for next time
                with contextlib.suppress(asyncio.CancelledError):
                    await downloads
        return 0

    return run_fast(main())


# -- simulate ----------------------------------------------------------------------------
def cmd_simulate(args: argparse.Namespace) -> int:
    from swarmgate.simulate import run_simulation

    return run_fast(
        run_simulation(
            gateway=args.gateway,
            admin_token=args.admin_token or os.environ.get("SWARMGATE_ADMIN_TOKEN", ""),
            devices=args.devices,
            model=args.model or "smollm2-135m-instruct-q4_1",
            mix=args.mix,
            sim_options=_sim_options(args),
            slots=args.slots,
            stop=None,
        )
    )


# -- up ----------------------------------------------------------------------------------
def cmd_up(args: argparse.Namespace) -> int:
    from swarmgate.quickstart import run_quickstart

    data_dir = (args.data_dir or default_data_dir()).expanduser()
    return run_fast(
        run_quickstart(
            data_dir=data_dir,
            host=args.host or "127.0.0.1",
            port=args.port or 8080,
            backend=args.backend,
            model=args.model[0] if args.model else "smollm2-135m-instruct-q4_1",
        )
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swarmgate", description="An open inference network on devices people own."
    )
    parser.add_argument("--version", action="version", version=f"swarmgate {__version__}")
    parser.add_argument("--log-level", default=os.environ.get("SWARMGATE_LOG_LEVEL", "INFO"))
    parser.add_argument("--log-json", action="store_true", help="one JSON object per log line")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    _add_gateway_args(serve)
    serve.set_defaults(func=cmd_serve)

    node = sub.add_parser("node", help="run a device node connected to a gateway")
    node.add_argument("--gateway", dest="gateway_url", help="ws(s)://host/v1/nodes/connect")
    node.add_argument("--token", help="device token (SWARMGATE_NODE_TOKEN)")
    node.add_argument("--backend", choices=["llama-cpp", "openai-http", "sim"])
    node.add_argument("--model", action="append", help="catalog model id (repeatable)")
    node.add_argument("--slots", type=int)
    node.add_argument("--region")
    node.add_argument("--cache-dir", type=Path, help="downloaded models (SWARMGATE_NODE_CACHE_DIR)")
    from swarmgate.node.provider_cli import add_node_run_args, add_provider_commands

    add_node_run_args(node)
    _add_sim_args(node)
    node.set_defaults(func=cmd_node)
    node_commands = node.add_subparsers(dest="node_command", required=False, metavar="COMMAND")
    from swarmgate.node.models_cli import add_models_parser

    add_models_parser(node_commands)
    add_provider_commands(node_commands)  # register, login, status

    up = sub.add_parser("up", help="gateway on SQLite plus one local device, in one command")
    _add_gateway_args(up)
    up.add_argument("--backend", default="llama-cpp", choices=["llama-cpp", "sim"])
    up.add_argument("--model", action="append")
    up.set_defaults(func=cmd_up)

    sim = sub.add_parser("simulate", help="run many simulated devices in one process")
    sim.add_argument("--gateway", default="http://127.0.0.1:8080", help="gateway base URL")
    sim.add_argument("--admin-token", help="to register the devices (SWARMGATE_ADMIN_TOKEN)")
    sim.add_argument("--devices", type=int, default=3)
    sim.add_argument("--model")
    sim.add_argument("--slots", type=int, default=1)
    sim.add_argument(
        "--mix",
        default="",
        help="profiles by count, e.g. 'healthy=6,slow=2,flaky=1,dying=1,hanging=1'",
    )
    _add_sim_args(sim)
    sim.set_defaults(func=cmd_simulate)

    from swarmgate.admin_cli import add_admin_parser

    add_admin_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "json", False):
        configure_logging(args.log_level, json=args.log_json)
    else:
        configure_logging("WARNING", json=args.log_json)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


def print_json(payload: Any) -> None:
    sys.stdout.write(orjson.dumps(payload, option=orjson.OPT_INDENT_2).decode() + "\n")


def new_admin_token() -> str:
    return secrets.token_urlsafe(32)


if __name__ == "__main__":
    raise SystemExit(main())
