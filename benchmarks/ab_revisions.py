"""The gateway at two git revisions, side by side: what a change costs on the request path.

    .venv/bin/python benchmarks/ab_revisions.py BEFORE [AFTER] [--reps 3] [--quick]

BEFORE and AFTER are git revisions (AFTER defaults to the working tree). Each is
exported to a temporary directory and run from there (``PYTHONPATH`` puts its ``src``
first; the virtual environment is shared, so both must work with the installed
dependencies). Everything else is ``billing_overhead.py``'s harness: one gateway (core
0, SQLite, billing on) and one sim device per side, phases alternating A B A B, medians
of the repetitions and of the paired p50 differences.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tarfile
import tempfile
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from billing_overhead import PLANS, run_phases  # noqa: E402
from gateway_overhead import RESULTS, Stack, git_state, machine, start_stack  # noqa: E402


def export(revision: str, into: Path) -> Path:
    """``revision``'s tree under ``into``; returns the directory to put on PYTHONPATH."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", revision, "src"],
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def table(results: dict[str, object], before: str, after: str) -> str:
    lines = [
        f"| phase | {before} p50 / p99 ms | {after} p50 / p99 ms | added p50 ms | req/s | "
        "gateway CPU µs/req |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name in ("c1", "c8", "open", "c64"):
        phase = results[name]
        assert isinstance(phase, dict)
        a, b = phase["off"], phase["on"]
        deltas = phase["paired_p50_delta_ms"]
        lines.append(
            f"| {name} | {a['p50_ms']:.3f} / {a['p99_ms']:.3f} | {b['p50_ms']:.3f} / "
            f"{b['p99_ms']:.3f} | {deltas[len(deltas) // 2]:+.3f} | {a['rps']:.0f} → "
            f"{b['rps']:.0f} ({b['rps'] / a['rps']:.2f}x) | {a['gateway_cpu_us_per_req']:.0f} "
            f"→ {b['gateway_cpu_us_per_req']:.0f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after", nargs="?")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int)
    args = parser.parse_args()
    plan = dict(PLANS["quick" if args.quick else "full"])
    if args.reps:
        plan["reps"] = args.reps
    after_label = args.after or "working tree"

    def log(line: str) -> None:
        print(line, flush=True)

    with tempfile.TemporaryDirectory(prefix="swarmgate-ab-") as tmp:
        trees = {"off": export(args.before, Path(tmp) / "before")}
        trees["on"] = export(args.after, Path(tmp) / "after") if args.after else ROOT / "src"
        stacks: dict[str, Stack] = {}
        try:
            for label, src in trees.items():
                data_dir = Path(tmp) / f"data-{label}"
                data_dir.mkdir()
                stacks[label] = start_stack(
                    data_dir, floor=False, extra_env={"PYTHONPATH": str(src)}
                )
                log(f"gateway from {src} is up")
            results = asyncio.run(run_phases(stacks, plan, log))
        finally:
            for stack in stacks.values():
                stack.stop()
    results["plan"] = plan
    results["machine"] = machine()
    results["git"] = git_state()
    results["revisions"] = {"before": args.before, "after": after_label}
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"ab_revisions-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(results, indent=2, default=str))
    print()
    print(table(results, args.before, after_label))
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
