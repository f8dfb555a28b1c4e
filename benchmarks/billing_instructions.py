"""What billing adds to a request, in instructions: the gateway under callgrind, billing
on and off, the same requests.

    .venv/bin/python benchmarks/billing_instructions.py [--requests 2000] [--concurrency 8]

Timed runs on a shared 2-core VM move by a third between runs; an instruction count does
not (callgrind counts what the CPU is asked to do, whatever else the machine does). So
this is the tool to compare two versions of the request path, below the noise of
``billing_overhead.py``; its timings remain the measure of the targets (cache misses and
wake-ups are not instructions).

For each of billing off and on: the ``gateway_overhead.py`` stack with the gateway run
under ``valgrind --tool=callgrind --separate-threads=yes`` (about 50x slower), a warm-up
of ``--warmup`` requests, then counting switched on for ``--requests`` requests at
``--concurrency`` (closed loop), switched off and dumped. The background writers' batching
intervals are stretched by ``--slowdown``, so each batch holds as many requests as at full
speed (and its cost per request is what it is there). Prints instructions per request
for the event loop's thread, the other threads (the billing writer posting, the job log's
database thread) and in all, and the difference on minus off.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from gateway_overhead import (  # noqa: E402
    RESULTS,
    closed_loop,
    git_state,
    machine,
    raw_request,
    start_stack,
)

_TOTALS = re.compile(rb"^totals: (\d+)", re.MULTILINE)


def _control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=120)


def _counted(data_dir: Path, pid: int) -> dict[str, int]:
    """Instructions per thread in the dumps made after counting was switched on: the
    files ``callgrind.out.<pid>.<dump>-<thread>``; thread 01 is the main thread."""
    counts = {"loop": 0, "others": 0}
    for path in sorted(data_dir.glob(f"callgrind.out.{pid}.*-*")):
        thread = path.name.rsplit("-", 1)[1]
        found = _TOTALS.search(path.read_bytes())
        if found is None:
            continue
        counts["loop" if thread == "01" else "others"] += int(found.group(1))
    counts["all"] = counts["loop"] + counts["others"]
    return counts


async def _drive(port: int, payload: bytes, concurrency: int, n: int) -> tuple[int, int]:
    run = await closed_loop(port, payload, concurrency, n=n)
    return len(run.latencies), run.errors


def measure(
    label: str, billing: bool, args: argparse.Namespace, tmp: Path, src: Path | None
) -> dict[str, Any]:
    data_dir = tmp / label
    data_dir.mkdir()
    wrap = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        "--separate-threads=yes",
        f"--callgrind-out-file={data_dir}/callgrind.out.%p",
    ]
    stack = start_stack(
        data_dir,
        floor=False,
        extra_env={
            "SWARMGATE_BILLING_ENABLED": "true" if billing else "false",
            # Batches as large as at full speed: the intervals stretched by the slowdown.
            "SWARMGATE_JOB_LOG_FLUSH_MS": str(round(50 * args.slowdown)),
            "SWARMGATE_SETTLE_POST_INTERVAL_S": str(0.05 * args.slowdown),
            **({"PYTHONPATH": str(src)} if src is not None else {}),
        },
        wrap=wrap,
        up_timeout=600,
    )
    try:
        pid = stack.pid("gateway")
        payload = raw_request(stack.gateway_port, stack.api_key, False)
        asyncio.run(_drive(stack.gateway_port, payload, args.concurrency, args.warmup))
        _control("--instr=on", str(pid))
        started = time.monotonic()
        ok, errors = asyncio.run(
            _drive(stack.gateway_port, payload, args.concurrency, args.requests)
        )
        _control("--instr=off", str(pid))
        _control("--dump", str(pid))
        seconds = time.monotonic() - started
        counts = _counted(data_dir, pid)
    finally:
        stack.stop()
    per = {name: value / ok for name, value in counts.items()} if ok else {}
    print(
        f"billing {label}: {ok} requests ({errors} errors) in {seconds:.0f} s under callgrind; "
        + ", ".join(f"{name} {value:,.0f}" for name, value in per.items())
        + " instructions per request",
        flush=True,
    )
    return {"requests": ok, "errors": errors, "instructions_per_request": per}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--slowdown",
        type=float,
        default=40.0,
        help="how much slower the gateway runs under callgrind: the job log's and the "
        "billing writer's batching intervals (50 ms) are stretched by it, so that their "
        "batches hold as many requests as at full speed",
    )
    parser.add_argument(
        "--revision",
        help="measure this git revision's src instead of the working tree (exported, put "
        "first on PYTHONPATH, as ab_revisions.py does); revisions older than the "
        "settle_post_interval_s setting post every 50 ms of callgrind's time, so their "
        "other threads' figures are not comparable",
    )
    parser.add_argument(
        "--keep",
        type=Path,
        metavar="DIR",
        help="leave the callgrind files (for callgrind_annotate) and logs in DIR",
    )
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind (callgrind) is not installed", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="swarmgate-billing-ir-") as tmp:
        where = Path(tmp)
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            where = args.keep
        src = None
        if args.revision is not None:
            from ab_revisions import export

            src = export(args.revision, Path(tmp) / "tree")
        results = {
            label: measure(label, billing, args, where, src)
            for label, billing in (("off", False), ("on", True))
        }
    off = results["off"]["instructions_per_request"]
    on = results["on"]["instructions_per_request"]
    added = {name: on[name] - off[name] for name in off}
    results["added_per_request"] = added
    results["plan"] = {name: str(value) for name, value in vars(args).items()}
    results["machine"] = machine()
    results["git"] = git_state()
    print(
        "billing adds "
        + ", ".join(
            f"{name} {value:+,.0f} ({value / off[name]:+.1%})" for name, value in added.items()
        )
        + " instructions per request"
    )
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS / f"billing_instructions-{stamp}.json"
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
