"""A/B the candidate fixes of ``gateway_whatif.py`` against the unpatched gateway.

    .venv/bin/python benchmarks/compare_whatif.py none async-gateway-dep fast-path,gc-freeze

Every configuration gets its own gateway (core 0) and sim node (core 1), all started up
front and idle when not measured. Rounds interleave the configurations (A B C A B C …)
so that noise from other work on the box spreads over all of them; the medians of the
rounds are reported: gateway CPU per request and requests/s at concurrency 64, and
latency p50/p99 at concurrency 1.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gateway_overhead as bench


async def one_round(stack: bench.Stack, c64_s: float, c1_n: int) -> dict[str, Any]:
    payload = bench.raw_request(stack.gateway_port, stack.api_key, False)
    pids = {"gateway": stack.pid("gateway"), "node": stack.pid("node")}
    await bench.closed_loop(stack.gateway_port, payload, 64, duration=1.0)  # warm-up
    with bench.cpu_meter(pids) as cpu:
        run = await bench.closed_loop(stack.gateway_port, payload, 64, duration=c64_s)
    c64 = bench.summarize(run, cpu)
    run = await bench.closed_loop(stack.gateway_port, payload, 1, n=c1_n)
    c1 = bench.summarize(run)
    return {
        "rps": c64["rps"],
        "errors": c64["errors"] + c1["errors"],
        "cpu_us_per_req": c64["gateway_cpu_us_per_req"],
        "gateway_core": c64["gateway_cpu_util"],
        "ctx_per_req": c64["gateway_ctx_switches_per_req"],
        "others_core": c64["others_cpu_util"],
        "c64_p50_ms": c64["p50_ms"],
        "c1_p50_ms": c1["p50_ms"],
        "c1_p99_ms": c1["p99_ms"],
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("configs", nargs="+", help="patch lists for gateway_whatif.py")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--c64-seconds", type=float, default=5.0)
    parser.add_argument("--c1-requests", type=int, default=1000)
    args = parser.parse_args()
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(0, {bench.CLIENT_CORE})
    bench.exit_on_sigterm()
    stacks: dict[str, bench.Stack] = {}
    dirs: list[Path] = []
    rounds: dict[str, list[dict[str, Any]]] = {c: [] for c in args.configs}
    try:
        for config in args.configs:
            data_dir = Path(tempfile.mkdtemp(prefix="swarmgate-ab-"))
            dirs.append(data_dir)
            print(f"starting {config}", flush=True)
            for attempt in range(3):  # a port picked as free can be taken meanwhile
                try:
                    stacks[config] = bench.start_stack(data_dir, whatif=config, floor=False)
                    break
                except RuntimeError as exc:
                    print(f"start failed ({exc}); retrying", flush=True)
                    shutil.rmtree(data_dir, ignore_errors=True)
                    data_dir.mkdir()
                    if attempt == 2:
                        raise
        import uvloop

        for number in range(args.rounds):
            for config, stack in stacks.items():
                result = uvloop.run(one_round(stack, args.c64_seconds, args.c1_requests))
                rounds[config].append(result)
                print(
                    f"round {number + 1} {config}: {result['rps']:.0f} req/s, "
                    f"{result['cpu_us_per_req']:.0f} us/req, c1 p50 {result['c1_p50_ms']:.3f} ms,"
                    f" others {result['others_core']:.0%}",
                    flush=True,
                )
    finally:
        for stack in stacks.values():
            stack.stop()
        for data_dir in dirs:
            shutil.rmtree(data_dir, ignore_errors=True)
    medians = {
        config: {key: statistics.median(r[key] for r in results) for key in results[0]}
        for config, results in rounds.items()
    }
    lowest = {
        config: min(r["cpu_us_per_req"] for r in results) for config, results in rounds.items()
    }
    base = medians[args.configs[0]]
    print()
    print(
        "| gateway | c64 req/s | gateway CPU µs/req (median) | vs first | lowest | vs first "
        "| c1 p50 ms | c1 p99 ms | ctx switches/req | others (cores) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for config, m in medians.items():
        print(
            f"| {config} | {m['rps']:.0f} | {m['cpu_us_per_req']:.0f} | "
            f"{m['cpu_us_per_req'] / base['cpu_us_per_req'] - 1:+.0%} | {lowest[config]:.0f} | "
            f"{lowest[config] / lowest[args.configs[0]] - 1:+.0%} | {m['c1_p50_ms']:.3f} | "
            f"{m['c1_p99_ms']:.3f} | {m['ctx_per_req']:.1f} | {m['others_core']:.2f} |"
        )
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    bench.RESULTS.mkdir(parents=True, exist_ok=True)
    out = bench.RESULTS / f"compare_whatif-{stamp}.json"
    out.write_bytes(
        orjson.dumps(
            {"rounds": rounds, "medians": medians, "lowest_cpu_us_per_req": lowest},
            option=orjson.OPT_INDENT_2,
        )
    )
    print(f"\nresults: {out.relative_to(bench.ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
