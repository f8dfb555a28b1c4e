"""``swarmgate serve`` with candidate fixes applied at run time, to measure them before
anyone changes ``src/``.

    SWARMGATE_PORT=... .venv/bin/python benchmarks/gateway_whatif.py PATCH[,PATCH...]
    .venv/bin/python benchmarks/gateway_overhead.py --whatif PATCH[,PATCH...]
    .venv/bin/python benchmarks/compare_whatif.py none PATCH PATCH,PATCH ...

Each patch mimics one proposed change in ``src/`` (see BENCHMARKS.md); ``none`` is the
unpatched gateway started the same way. Patches marked "cost probe" only *remove* work,
to measure what that work costs; they are not fixes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any

PATCHES: dict[str, str] = {
    "none": "unpatched (built and GC-tuned exactly as `swarmgate serve` does)",
    "joblog-500ms": "SWARMGATE_JOB_LOG_FLUSH_MS=500 (ten times fewer, bigger job-log batches)",
    "joblog-isoformat": "job-log timestamps formatted with datetime.isoformat (C) instead of "
    "astimezone + strftime",
    "no-gc-tuning": "(cost probe) skip tune_gc_for_serving: default thresholds, nothing frozen",
    "no-watch": "(cost probe) no disconnect watcher at all for non-streamed requests",
    "no-joblog": "(cost probe) JobLog.record does nothing",
    "gc-stats": "(diagnosis) time every cyclic-GC pass; log count, mean and max pause per "
    "generation every 5 s",
    "slow-callbacks": "(diagnosis) event-loop debug mode: log every callback or task step "
    "that holds the loop for more than 5 ms (debug mode itself costs about 3x CPU)",
}


def apply(names: list[str]) -> Any:
    """Builds the ASGI app the way ``swarmgate serve`` does (``create_asgi_app`` where the
    tree has it, then ``tune_gc_for_serving``), with ``names`` applied; returns the uvicorn
    config."""
    if "joblog-500ms" in names:
        os.environ["SWARMGATE_JOB_LOG_FLUSH_MS"] = "500"

    from swarmgate import cli
    from swarmgate.api import app as app_module
    from swarmgate.api import chat, running
    from swarmgate.config import GatewaySettings

    settings = GatewaySettings()
    served: Any
    if hasattr(app_module, "create_asgi_app"):
        served = app_module.create_asgi_app(settings)
        # The FastAPI app sits under a chain of ASGI wrappers; one of them holds the gateway.
        layer = served
        while not hasattr(layer, "gateway"):
            layer = layer.app
        app, gateway = layer.app, layer.gateway
    else:  # older trees: the FastAPI app is what the server runs
        served = app = app_module.create_app(settings)
        gateway = app.state.gateway

    if "no-watch" in names:

        async def complete_only(_request: Any, execution: Any) -> Any:
            return await execution.complete()

        chat.complete_or_cancel = complete_only  # type: ignore[assignment]
        running.complete_or_cancel = complete_only  # type: ignore[assignment]

    if "joblog-isoformat" in names:
        from swarmgate.routing import joblog

        joblog.sqlite_value = _sqlite_value_isoformat

    if "no-joblog" in names:
        gateway.job_log.record = lambda *_a, **_k: None

    if "gc-stats" in names:
        install_gc_stats()

    if "slow-callbacks" in names:
        debug_lifespan = app.router.lifespan_context

        @contextlib.asynccontextmanager
        async def lifespan_debug(app_: Any) -> Any:
            loop = asyncio.get_running_loop()
            loop.set_debug(True)
            loop.slow_callback_duration = 0.005
            logging.getLogger("asyncio").setLevel(logging.WARNING)
            async with debug_lifespan(app_) as state:
                yield state

        app.router.lifespan_context = lifespan_debug

    config = cli.uvicorn_config(served, settings)
    if "no-gc-tuning" not in names and hasattr(cli, "tune_gc_for_serving"):
        cli.tune_gc_for_serving()
    return config


def _sqlite_value_isoformat(value: Any) -> Any:
    if isinstance(value, datetime):
        if value.tzinfo is not UTC:
            value = value.astimezone(UTC)
        return value.isoformat(" ", "microseconds")[:26]
    if isinstance(value, bool):
        return int(value)
    return value


def install_gc_stats() -> None:
    """Times each collection (gc.callbacks) and logs a summary every 5 s."""
    import threading
    import time

    started: dict[str, float] = {}
    pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
    log = logging.getLogger("swarmgate.bench.gc")

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started["t"] = time.perf_counter()
        elif "t" in started:
            pauses[info["generation"]].append(time.perf_counter() - started.pop("t"))

    def report() -> None:
        while True:
            time.sleep(5)
            parts = []
            for generation, values in pauses.items():
                if values:
                    parts.append(
                        f"gen{generation}: {len(values)} passes, mean "
                        f"{sum(values) / len(values) * 1e3:.2f} ms, max {max(values) * 1e3:.2f} ms"
                    )
                    values.clear()
            if parts:
                log.warning("gc in the last 5 s: %s", "; ".join(parts))

    gc.callbacks.append(callback)
    threading.Thread(target=report, daemon=True, name="gc-stats").start()


def main(argv: list[str]) -> int:
    import uvicorn

    from swarmgate.logs import configure_logging

    names = [n for n in (argv[0] if argv else "none").split(",") if n]
    unknown = [n for n in names if n not in PATCHES]
    if unknown:
        print(f"unknown patch(es): {unknown}; known: {sorted(PATCHES)}", file=sys.stderr)
        return 2
    configure_logging(os.environ.get("SWARMGATE_LOG_LEVEL", "WARNING"))
    uvicorn.Server(apply(names)).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
