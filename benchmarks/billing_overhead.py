"""What billing adds to a request: the same gateway with billing on and off, side by side.

    .venv/bin/python benchmarks/billing_overhead.py            # full run (~4 minutes)
    .venv/bin/python benchmarks/billing_overhead.py --quick    # smoke run (~1 minute)

Two stacks run at once, identical but for ``SWARMGATE_BILLING_ENABLED``: each is a
``swarmgate serve`` on core 0 and one sim device (``--slots 256``) on core 1, with this
process as the load generator on core 1 (see ``gateway_overhead.py`` for the harness).
With billing on, every request takes a credit hold before dispatch and its charge is
settled — written to SQLite in a group commit — before the answer is sent.

Phases, each run on both stacks in alternation (A B A B …, so drift on the box hits both),
medians of the repetitions reported:

* ``c1``: concurrency 1 — the latency billing adds to one request (p50, p99);
* ``c8``: concurrency 8 — latency under some contention;
* ``open``: open loop at a fixed rate (default 500 requests/s) — latency at moderate load;
* ``c64``: concurrency 64 — throughput, and the gateway's CPU per request.

Results go to ``benchmarks/results/billing_overhead-<time>.json`` and a markdown table
is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from gateway_overhead import (  # noqa: E402
    RESULTS,
    Stack,
    closed_loop,
    cpu_meter,
    git_state,
    machine,
    median_of,
    open_loop,
    raw_request,
    start_stack,
    summarize,
    wait_quiet,
)

PLANS = {
    "full": {"reps": 5, "c1_n": 2000, "c8_n": 6000, "open_rate": 500, "open_s": 6, "c64_s": 8},
    "quick": {"reps": 1, "c1_n": 300, "c8_n": 800, "open_rate": 500, "open_s": 2, "c64_s": 2},
}


async def run_phases(
    stacks: dict[str, Stack], plan: dict[str, Any], log: Callable[[str], None]
) -> dict[str, Any]:
    phases: dict[str, Callable[[int, bytes], Any]] = {
        "c1": lambda port, p: closed_loop(port, p, 1, n=plan["c1_n"]),
        "c8": lambda port, p: closed_loop(port, p, 8, n=plan["c8_n"]),
        "open": lambda port, p: open_loop(port, p, plan["open_rate"], plan["open_s"], 64),
        "c64": lambda port, p: closed_loop(port, p, 64, duration=plan["c64_s"]),
    }
    results: dict[str, Any] = {}
    for name, go in phases.items():
        if name not in plan.get("phases", phases):
            continue
        reps: dict[str, list[dict[str, Any]]] = {label: [] for label in stacks}
        for rep in range(plan["reps"]):
            order = list(stacks) if rep % 2 == 0 else list(reversed(stacks))
            for label in order:
                stack = stacks[label]
                payload = raw_request(stack.gateway_port, stack.api_key, False)
                if plan["reps"] > 1:
                    await wait_quiet(0.25, log)
                await closed_loop(stack.gateway_port, payload, 8, duration=1.0)  # warm-up
                pids = {"gateway": stack.pid("gateway"), "node": stack.pid("node")}
                with cpu_meter(pids) as cpu:
                    run = await go(stack.gateway_port, payload)
                summary = summarize(run, cpu)
                reps[label].append(summary)
                log(
                    f"  {name} rep {rep + 1} {label}: {summary['rps']:.0f} req/s, "
                    f"p50 {summary['p50_ms']:.3f} ms, p99 {summary['p99_ms']:.3f} ms, "
                    f"gateway {summary['gateway_cpu_us_per_req']:.0f} us/req "
                    f"(event loop {summary.get('gateway_loop_cpu_us_per_req', 0):.0f}), "
                    f"errors {summary['errors']}"
                )
        results[name] = {label: median_of(r) for label, r in reps.items()}
        results[name]["paired_p50_delta_ms"] = sorted(
            on["p50_ms"] - off["p50_ms"] for on, off in zip(reps["on"], reps["off"], strict=True)
        )
    return results


def ledger_check(stack: Stack) -> dict[str, int]:
    """The books of the billed stack after the run: every answer charged, books balanced."""
    db = sqlite3.connect(stack.data_dir / "swarmgate.db")
    try:
        charges = db.execute(
            "SELECT count(*), coalesce(sum(cost_micros), 0) FROM charges"
        ).fetchone()
        total = db.execute("SELECT coalesce(sum(amount_micros), 0) FROM balances").fetchone()[0]
        batches = db.execute("SELECT count(DISTINCT created_at) FROM charges").fetchone()[0]
    finally:
        db.close()
    return {
        "charges": charges[0],
        "charged_micros": charges[1],
        "books_sum": total,
        "distinct_times": batches,
    }


def table(results: dict[str, Any]) -> str:
    lines = [
        "| phase | billing off p50 / p99 ms | billing on p50 / p99 ms | added p50 ms | req/s off → on | gateway CPU µs/req off → on |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in ("c1", "c8", "open", "c64"):
        if name not in results:
            continue
        off, on = results[name]["off"], results[name]["on"]
        deltas = results[name]["paired_p50_delta_ms"]
        median_delta = deltas[len(deltas) // 2]
        lines.append(
            f"| {name} | {off['p50_ms']:.3f} / {off['p99_ms']:.3f} | {on['p50_ms']:.3f} / "
            f"{on['p99_ms']:.3f} | {median_delta:+.3f} | {off['rps']:.0f} → {on['rps']:.0f} "
            f"({on['rps'] / off['rps']:.2f}x) | {off['gateway_cpu_us_per_req']:.0f} → "
            f"{on['gateway_cpu_us_per_req']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int)
    parser.add_argument(
        "--phases", default="c1,c8,open,c64", help="comma-separated subset of c1,c8,open,c64"
    )
    parser.add_argument(
        "--on-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for the billed stack only (a setting under test, "
        "e.g. SWARMGATE_SETTLE_POST_INTERVAL_S=1); repeatable",
    )
    args = parser.parse_args(argv)
    plan: dict[str, Any] = dict(PLANS["quick" if args.quick else "full"])
    if args.reps:
        plan["reps"] = args.reps
    plan["phases"] = args.phases.split(",")
    on_env = dict(item.split("=", 1) for item in args.on_env)
    plan["on_env"] = on_env

    def log(line: str) -> None:
        print(line, flush=True)

    with tempfile.TemporaryDirectory(prefix="swarmgate-billing-bench-") as tmp:
        stacks: dict[str, Stack] = {}
        try:
            for label, enabled in (("off", "false"), ("on", "true")):
                data_dir = Path(tmp) / label
                data_dir.mkdir()
                env = {"SWARMGATE_BILLING_ENABLED": enabled, **(on_env if label == "on" else {})}
                stacks[label] = start_stack(data_dir, floor=False, extra_env=env)
                log(f"stack with billing {label} is up")
            results = asyncio.run(run_phases(stacks, plan, log))
            # Stopped first: a stopping gateway posts every charge its journal still holds.
            stacks["on"].stop()
            results["ledger"] = ledger_check(stacks["on"])
        finally:
            for stack in stacks.values():
                stack.stop()
    results["plan"] = plan
    results["machine"] = machine()
    results["git"] = git_state()
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS / f"billing_overhead-{stamp}.json"
    out.write_text(json.dumps(results, indent=2, default=str))
    print()
    print(table(results))
    print()
    print(f"ledger after the run: {results['ledger']}")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
