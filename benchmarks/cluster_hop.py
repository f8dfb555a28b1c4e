"""Scale-out: the cost of the cross-gateway hop, and throughput with one and two gateways.

    .venv/bin/python benchmarks/cluster_hop.py            # ~3 minutes
    .venv/bin/python benchmarks/cluster_hop.py --quick    # ~1 minute

Needs the local PostgreSQL and Redis (``scripts/services.sh``). Each run makes a fresh
PostgreSQL database and a fresh Redis key prefix and removes both at the end.

Processes: gateways A and B (``swarmgate serve`` on PostgreSQL + Redis), sim nodes
(``swarmgate node --backend sim``, 256 slots, 16-token answers, no delay), and this
process as the load generator (the raw keep-alive HTTP client of
``gateway_overhead.py``).

1. ``hop``: one sim device, connected to B. Concurrency 1, non-streamed requests,
   alternating between B (direct: the device is B's own) and A (the hop: A's request
   runs on B's device). The rounds interleave the two paths so that noise falls on
   both; p50/p99 per path and the difference of the medians. Streamed requests the
   same way, for the time to the first token. Twice: the attempts crossing through
   Redis pub/sub, then over a direct link between the gateways (``cluster/links.py``).
2. ``parts``: what the hop is made of, in this process: one Redis traversal (PUBLISH
   on one connection, delivered to a subscriber), and the mesh's whole round trip (two
   ``Mesh`` objects on one event loop, a device that answers at once).
3. ``throughput``: concurrency 64 for a fixed time against (a) gateway A alone with its
   own sim node, and (b) A and B together, each with its own sim node, the load split
   half and half (the gateways linked). Requests/s, errors, and CPU per request of each
   process.

4. ``ablation``: one gateway with its node at concurrency 64, three ways: scaled out
   (PostgreSQL + Redis), scaled out with billing off, and PostgreSQL without Redis (holds
   in memory): where the scaled-out request path spends its time.

On this 2-core machine every process shares the two cores with PostgreSQL, Redis, the
sim nodes and the load generator: (b) shows what a second gateway process costs and
adds where no core is idle; BENCHMARKS.md explains how it scales with cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gateway_overhead as bench

POSTGRES = os.environ.get(
    "SWARMGATE_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
REDIS = os.environ.get("SWARMGATE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
LINK_SECRET = "the benchmark network's link secret"


class Network:
    """A fresh database and Redis prefix, the gateways and nodes on them."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.db = f"sg_bench_{secrets.token_hex(4)}"
        self.prefix = f"sgb{secrets.token_hex(3)}:"
        self.database_url = (
            POSTGRES.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
            + f"/{self.db}"
        )
        self.env = {
            **os.environ,
            "SWARMGATE_DATABASE_URL": self.database_url,
            "SWARMGATE_REDIS_URL": REDIS,
            "SWARMGATE_REDIS_PREFIX": self.prefix,
            "SWARMGATE_ADMIN_TOKEN": bench.ADMIN_TOKEN,
            "SWARMGATE_LOG_LEVEL": "WARNING",
            "SWARMGATE_CANARY_INTERVAL_S": "0",
        }
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.ports: dict[str, int] = {}

    async def create(self) -> None:
        import asyncpg

        conn = await asyncpg.connect(POSTGRES)
        await conn.execute(f'CREATE DATABASE "{self.db}"')
        await conn.close()
        dev = bench.admin(
            self.env, "accounts", "create", "--name", "bench-dev", "--credits", "100000"
        )
        self.key = bench.admin(self.env, "keys", "create", "--account", dev["id"])["key"]
        self.provider = bench.admin(self.env, "accounts", "create", "--name", "prov", "--provider")[
            "id"
        ]

    def gateway(self, name: str, *, linked: bool = False) -> int:
        port = bench.free_port()
        log = (self.work / f"{name}.log").open("wb")
        links = {}
        if linked:
            links = {
                "SWARMGATE_CLUSTER_LINK_PORT": str(bench.free_port()),
                "SWARMGATE_CLUSTER_LINK_BIND": "127.0.0.1",
                "SWARMGATE_CLUSTER_LINK_HOST": "127.0.0.1",
                "SWARMGATE_CLUSTER_SECRET": LINK_SECRET,
            }
        self.procs[name] = subprocess.Popen(
            bench.swarmgate("serve"),
            env={
                **self.env,
                **links,
                "SWARMGATE_PORT": str(port),
                "SWARMGATE_GATEWAY_ID": name,
                "SWARMGATE_DATA_DIR": str(self.work / name),
            },
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.ports[name] = port
        deadline = time.monotonic() + 60
        while bench._get_json(f"http://127.0.0.1:{port}/healthz") is None:
            if time.monotonic() > deadline or self.procs[name].poll() is not None:
                raise SystemExit(f"gateway {name} did not start; see {log.name}")
            time.sleep(0.1)
        return port

    def node(self, name: str, gateway: str) -> None:
        token = bench.admin(self.env, "devices", "create", "--account", self.provider)["token"]
        log = (self.work / f"{name}.log").open("wb")
        self.procs[name] = subprocess.Popen(
            bench.swarmgate(
                "node",
                "--gateway",
                f"ws://127.0.0.1:{self.ports[gateway]}/v1/nodes/connect",
                "--token",
                token,
                "--backend",
                "sim",
                "--model",
                bench.MODEL,
                "--slots",
                "256",
                "--sim-length",
                "16",
            ),
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def wait_devices(self, gateway: str, count: int) -> None:
        deadline = time.monotonic() + 60
        url = f"http://127.0.0.1:{self.ports[gateway]}/readyz"
        while (bench._get_json(url) or {}).get("devices", 0) != count:
            if time.monotonic() > deadline:
                raise SystemExit(f"{gateway} never saw {count} device(s)")
            time.sleep(0.1)

    def stop(self, *names: str) -> None:
        for name in names or list(self.procs):
            proc = self.procs.pop(name)
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()

    async def destroy(self) -> None:
        import asyncpg
        from redis.asyncio import Redis

        self.stop()
        conn = await asyncpg.connect(POSTGRES)
        await conn.execute(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')
        await conn.close()
        client = Redis.from_url(REDIS)
        async for key in client.scan_iter(match=f"{self.prefix}*", count=500):
            await client.delete(key)
        await client.aclose()


async def hop_phase(net: Network, rounds: int, per_round: int, linked: bool) -> dict[str, Any]:
    net.gateway("A", linked=linked)
    net.gateway("B", linked=linked)
    net.node("node-B", "B")
    net.wait_devices("B", 1)
    net.wait_devices("A", 1)
    if linked:
        await asyncio.sleep(3)  # a few liveness ticks: A has dialled B
    out: dict[str, Any] = {}
    for stream in (False, True):
        payloads = {
            name: bench.raw_request(net.ports[name], net.key, stream) for name in ("A", "B")
        }
        samples: dict[str, list[float]] = {"A": [], "B": []}
        for name in ("A", "B"):  # warm-up
            await bench.closed_loop(net.ports[name], payloads[name], 1, n=100)
        for _ in range(rounds):
            for name in ("B", "A"):
                run = await bench.closed_loop(net.ports[name], payloads[name], 1, n=per_round)
                if run.errors:
                    raise SystemExit(f"{run.errors} errors on {name}: {run.statuses}")
                samples[name].extend(run.firsts if stream else run.latencies)
        kind = "stream_first_token" if stream else "completion"
        direct, hop = samples["B"], samples["A"]
        out[kind] = {
            "direct_p50_ms": statistics.median(direct) * 1e3,
            "direct_p99_ms": bench.pct(direct, 99) * 1e3,
            "hop_p50_ms": statistics.median(hop) * 1e3,
            "hop_p99_ms": bench.pct(hop, 99) * 1e3,
            "added_p50_ms": (statistics.median(hop) - statistics.median(direct)) * 1e3,
            "requests_per_path": len(direct),
        }
    net.stop("node-B", "A", "B")
    return out


async def parts_phase(net: Network, n: int = 2000) -> dict[str, Any]:
    from redis.asyncio import Redis

    from swarmgate.cluster.mesh import Mesh
    from swarmgate.config import GatewaySettings
    from swarmgate.protocol import Done, Usage
    from swarmgate.routing.profile import DeviceProfile
    from swarmgate.routing.registry import DeviceConnection, DeviceRegistry
    from swarmgate.routing.states import ConnectionState

    out: dict[str, Any] = {}
    publisher, subscriber = Redis.from_url(REDIS), Redis.from_url(REDIS)
    pubsub = subscriber.pubsub(ignore_subscribe_messages=True)
    channel = f"{net.prefix}probe".encode()
    await pubsub.subscribe(channel)
    conn = publisher.connection_pool.make_connection()
    await conn.connect()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        await conn.send_packed_command(conn.pack_commands([(b"PUBLISH", channel, b"x" * 200)]))
        while await pubsub.get_message(timeout=1.0) is None:
            pass
        samples.append(time.perf_counter() - start)
        await conn.read_response()
    out["redis_traversal_p50_us"] = statistics.median(samples) * 1e6
    await conn.disconnect()
    await pubsub.aclose()
    await publisher.aclose()
    await subscriber.aclose()

    def settings(name: str) -> GatewaySettings:
        return GatewaySettings(
            database_url=net.database_url,
            redis_url=REDIS,
            redis_prefix=net.prefix + "parts:",
            gateway_id=name,
        )

    async def profile(device_id: str, account_id: str, _engine: str) -> DeviceProfile:
        return DeviceProfile(device_id=device_id, account_id=account_id)

    origin_registry, holder_registry = DeviceRegistry(), DeviceRegistry()
    origin = Mesh(settings("origin"), origin_registry, profile)
    holder = Mesh(settings("holder"), holder_registry, profile)
    await origin.start()
    await holder.start()
    device = DeviceConnection(
        device_id="dev_parts",
        account_id="acct_parts",
        region="x",
        slots=1,
        models=frozenset({bench.MODEL}),
        send_text=None,  # type: ignore[arg-type]
    )
    loop = asyncio.get_running_loop()

    def answer(text: str) -> None:  # the device: a Done for every job, at once
        frame = orjson.loads(text)
        if frame["type"] == "job":
            done = Done(
                type="done",
                job_id=frame["job_id"],
                finish_reason="stop",
                usage=Usage(prompt_tokens=3, completion_tokens=4),
                text="hello",
            )
            loop.call_soon(device.active[frame["job_id"]].put_nowait, done)

    device.send = answer  # type: ignore[method-assign]
    device.transition(ConnectionState.READY)
    holder_registry.add(device)
    holder.device_changed(device)
    while (remote := origin_registry.get("dev_parts")) is None:
        await asyncio.sleep(0.01)
    job = orjson.loads(bench.request_body(False))
    samples = []
    for i in range(n):
        attempt = f"job_{i}.1"
        channel_q: asyncio.Queue[Any] = asyncio.Queue()
        remote.occupy(attempt, channel_q)
        frame = {"type": "job", "job_id": attempt, "model": bench.MODEL, "stream": False}
        frame |= {
            "messages": job["messages"],
            "params": {"max_tokens": 16, "temperature": 0, "top_p": 1},
        }
        start = time.perf_counter()
        remote.send(orjson.dumps(frame).decode())
        await channel_q.get()
        samples.append(time.perf_counter() - start)
        remote.vacate(attempt)
    out["mesh_round_trip_p50_us"] = statistics.median(samples) * 1e6
    await origin.stop()
    await holder.stop()
    return out


async def load(ports: list[int], key: str, seconds: float, pids: dict[str, int]) -> dict[str, Any]:
    payloads = [bench.raw_request(port, key, False) for port in ports]
    share = 64 // len(ports)
    for port, payload in zip(ports, payloads, strict=True):
        await bench.closed_loop(port, payload, share, duration=1.0)  # warm-up
    with bench.cpu_meter(pids) as cpu:
        runs = await asyncio.gather(
            *(
                bench.closed_loop(port, payload, share, duration=seconds)
                for port, payload in zip(ports, payloads, strict=True)
            )
        )
    ok = sum(len(r.latencies) for r in runs)
    wall = max(r.wall_s for r in runs)
    result: dict[str, Any] = {
        "rps": ok / wall,
        "errors": sum(r.errors for r in runs),
        "p50_ms": bench.pct([x for r in runs for x in r.latencies], 50) * 1e3,
    }
    for name, value in cpu.items():
        if not name.endswith("_ctx_switches"):
            result[f"{name}_cpu_us_per_req"] = value / ok * 1e6 if ok else float("nan")
            result[f"{name}_cores"] = value / wall
    return result


async def throughput_phase(net: Network, reps: int, seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {"one": [], "two": []}
    net.gateway("A", linked=True)
    net.node("node-A", "A")
    net.wait_devices("A", 1)
    pids = {"gateway_A": net.procs["A"].pid, "node_A": net.procs["node-A"].pid}
    for _ in range(reps):  # A alone, with its own node
        out["one"].append(await load([net.ports["A"]], net.key, seconds, pids))
    net.gateway("B", linked=True)
    net.node("node-B", "B")
    net.wait_devices("A", 2)
    net.wait_devices("B", 2)
    pids |= {"gateway_B": net.procs["B"].pid, "node_B": net.procs["node-B"].pid}
    for _ in range(reps):  # A and B, each with its node, the load split between them
        out["two"].append(await load([net.ports["A"], net.ports["B"]], net.key, seconds, pids))
    net.stop()
    return {name: bench.median_of(reps_) for name, reps_ in out.items()}


async def ablation_phase(net: Network, seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    configs = {
        "scaled_out": {},
        "scaled_out_billing_off": {"SWARMGATE_BILLING_ENABLED": "false"},
        "postgres_without_redis": {"SWARMGATE_REDIS_URL": ""},
    }
    base_env = dict(net.env)
    for name, extra in configs.items():
        net.env = {**base_env, **extra}
        net.gateway("A")
        net.node("node-A", "A")
        net.wait_devices("A", 1)
        payload = bench.raw_request(net.ports["A"], net.key, False)
        await bench.closed_loop(net.ports["A"], payload, 64, duration=1.0)  # warm-up
        run = await bench.closed_loop(net.ports["A"], payload, 64, duration=seconds)
        out[name] = bench.summarize(run)
        net.stop("node-A", "A")
    net.env = base_env
    return out


async def main(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="sg-cluster-bench-"))
    results: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": bench.machine(),
        "git": bench.git_state(),
    }
    rounds, per_round = (3, 100) if args.quick else (args.rounds, args.per_round)
    seconds = 3.0 if args.quick else args.seconds
    net = Network(work)
    await net.create()
    try:
        print("hop: direct vs through another gateway ...", flush=True)
        results["hop"] = {
            transport: await hop_phase(net, rounds, per_round, transport == "link")
            for transport in ("redis", "link")
        }
        print(orjson.dumps(results["hop"], option=orjson.OPT_INDENT_2).decode(), flush=True)
        print("parts of the hop ...", flush=True)
        results["parts"] = await parts_phase(net, 500 if args.quick else 2000)
        print(orjson.dumps(results["parts"], option=orjson.OPT_INDENT_2).decode(), flush=True)
        print("throughput: one gateway vs two ...", flush=True)
        results["throughput"] = await throughput_phase(net, 1 if args.quick else args.reps, seconds)
        print(orjson.dumps(results["throughput"], option=orjson.OPT_INDENT_2).decode())
        print("ablation: what the scaled-out path spends its time on ...", flush=True)
        results["ablation"] = await ablation_phase(net, seconds)
        summary = {
            k: {"rps": v["rps"], "errors": v["errors"]} for k, v in results["ablation"].items()
        }
        print(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
    finally:
        with contextlib.suppress(Exception):
            await net.destroy()
    bench.RESULTS.mkdir(exist_ok=True)
    out = bench.RESULTS / f"cluster_hop-{datetime.now(UTC):%Y%m%dT%H%M%S}.json"
    out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    print(f"results: {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=200)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0)
    import uvloop  # the gateways' loop: the in-process parts are measured on it too

    uvloop.run(main(parser.parse_args()))
