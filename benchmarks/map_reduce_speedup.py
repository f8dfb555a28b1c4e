"""How map_reduce scales with devices: N chunks over K ``sim`` devices.

    .venv/bin/python benchmarks/map_reduce_speedup.py                 # ~1 minute
    .venv/bin/python benchmarks/map_reduce_speedup.py --chunks 24 --devices 1 2 4 8 --reps 3

One gateway (SQLite, billing on) and K ``sim`` devices of one slot each, in one
process, on real sockets. Every device takes ``--ttft-ms`` to its first token and
streams ``--tokens`` tokens at ``--tokens-per-s``, so one step takes about
ttft + tokens / rate. One orchestrated request (``workflow: map_reduce``) carries an
input sized to split into about ``--chunks`` chunks (SmolLM2's tokenizer decides the
exact number, printed); the run is N map steps (in parallel, at
most K at a time) and one final reduce. Reported per K: the wall time of the request,
the map phase (first map start to last map end, from the run's own step records), the
step time, and the speed-up of both against K = 1; the ideal map phase is
ceil(N / K) step times. Medians of ``--reps``. Results also go to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import socket
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from swarmgate.accounts import service
from swarmgate.api.app import create_asgi_app
from swarmgate.config import GatewaySettings
from swarmgate.gateway import Gateway
from swarmgate.node.agent import NodeAgent
from swarmgate.node.backends.sim import SimBackend, SimConfig
from swarmgate.protocol import DeviceFacts

MODEL = "smollm2-135m-instruct-q4_1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Quiet(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


def document(chunks: int) -> str:
    """A text that splits into ``chunks`` chunks for SmolLM2's 2048-token device context."""
    paragraph = "The survey recorded river otters at every site, counting pups and adults. "
    part = (paragraph * 9).strip()  # ~140 tokens a paragraph
    return "Summarise the survey.\n\n" + "\n\n".join(f"Site {i}: {part}" for i in range(chunks * 5))


async def one_run(args: argparse.Namespace, devices: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as data_dir:
        settings = GatewaySettings(
            data_dir=Path(data_dir),
            port=free_port(),
            canary_interval_s=0,
            first_token_timeout_s=30,
            token_stall_timeout_s=30,
            queue_wait_s=60,
        )
        gateway = Gateway(settings)
        server = Quiet(
            uvicorn.Config(
                create_asgi_app(settings, gateway),
                host="127.0.0.1",
                port=settings.port,
                log_config=None,
                access_log=False,
                ws="websockets-sansio",
            )
        )
        serving = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        agents = []
        try:
            provider = await service.create_account(
                gateway.engine, name="p", developer=False, provider=True
            )
            for _ in range(devices):
                device = await service.create_device(gateway.engine, account_id=provider["id"])
                config = SimConfig(
                    ttft_ms=args.ttft_ms,
                    tokens_per_s=args.tokens_per_s,
                    length=args.tokens,
                    context_length=2048,
                )
                agent = NodeAgent(
                    gateway_url=f"ws://127.0.0.1:{settings.port}/v1/nodes/connect",
                    token=device.secret,
                    backend=SimBackend(config),
                    models=[MODEL],
                    slots=1,
                    facts=DeviceFacts(os="sim", cpu="sim", ram_mb=1024),
                )
                stop = asyncio.Event()
                agents.append((stop, asyncio.create_task(agent.run(stop))))
            while gateway.registry.device_count(MODEL) < devices:
                await asyncio.sleep(0.01)
            account = await service.create_account(
                gateway.engine, name="dev", credit_micros=100_000_000
            )
            key = await service.create_api_key(gateway.engine, account_id=account["id"])
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": document(args.chunks)}],
                "orchestration": {"workflow": "map_reduce", "max_steps": 100},
            }
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{settings.port}",
                headers={"Authorization": f"Bearer {key.secret}"},
                timeout=600,
            ) as client:
                started = time.perf_counter()
                reply = await client.post("/v1/chat/completions", json=body)
                wall = time.perf_counter() - started
                reply.raise_for_status()
                run_id = reply.json()["swarmgate"]["workflow"]["id"]
                run = (await client.get(f"/v1/workflows/{run_id}")).json()
            maps = [s for s in run["steps"] if s["name"].startswith("map")]
            step_ms = statistics.median(s["duration_ms"] for s in maps)
            map_phase = await _map_phase(gateway, run_id)
            return {
                "wall_s": wall,
                "map_phase_s": map_phase,
                "maps": float(len(maps)),
                "step_ms": float(step_ms),
            }
        finally:
            for stop, _task in agents:
                stop.set()
            for _stop, task in agents:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(task, 5)
            server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(serving, 10)


async def _map_phase(gateway: Gateway, run_id: str) -> float:
    """First map start to last map end, seconds (finish times and durations as recorded)."""
    from sqlalchemy import select

    from swarmgate.store.tables import workflow_steps

    async with gateway.engine.connect() as conn:
        rows = (
            await conn.execute(
                select(
                    workflow_steps.c.name,
                    workflow_steps.c.finished_at,
                    workflow_steps.c.duration_ms,
                ).where(workflow_steps.c.run_id == run_id)
            )
        ).all()
    spans = []
    for row in rows:
        if not row.name.startswith("map"):
            continue
        end = row.finished_at if row.finished_at.tzinfo else row.finished_at.replace(tzinfo=UTC)
        spans.append((end.timestamp() - row.duration_ms / 1000, end.timestamp()))
    return max(e for _, e in spans) - min(s for s, _ in spans)


async def main(args: argparse.Namespace) -> None:
    results: dict[int, dict[str, float]] = {}
    for k in args.devices:
        runs = [await one_run(args, k) for _ in range(args.reps)]
        results[k] = {name: statistics.median(r[name] for r in runs) for name in runs[0]}
    base = results[args.devices[0]]
    step_s = args.ttft_ms / 1000 + args.tokens / args.tokens_per_s
    alone = results[args.devices[-1]]["step_ms"]
    print(
        f"map_reduce: {int(base['maps'])} map steps + the final reduce; one step is "
        f"~{step_s * 1000:.0f} ms by the sim settings (median map step, queueing included, "
        f"{alone:.0f} ms with {args.devices[-1]} devices); medians of {args.reps} run(s)\n"
    )
    print(
        "| devices | request wall s | map phase s | ideal map phase s | speed-up (wall) | speed-up (maps) |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for k, r in results.items():
        ideal = math.ceil(r["maps"] / k) * step_s
        print(
            f"| {k} | {r['wall_s']:.2f} | {r['map_phase_s']:.2f} | {ideal:.2f} | "
            f"{base['wall_s'] / r['wall_s']:.2f}x | {base['map_phase_s'] / r['map_phase_s']:.2f}x |"
        )
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (out / f"map_reduce_speedup-{stamp}.json").write_text(
        json.dumps({"args": vars(args), "results": results}, indent=2)
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--ttft-ms", type=float, default=100.0)
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--tokens-per-s", type=float, default=200.0)
    parser.add_argument("--reps", type=int, default=1)
    arguments = parser.parse_args()
    if arguments.devices[0] != 1:
        sys.exit("the first --devices value is the baseline; start with 1")
    asyncio.run(main(arguments))
