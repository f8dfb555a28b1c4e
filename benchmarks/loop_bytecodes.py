"""Python bytecodes the gateway's event loop runs per request, by function, billing on
against off: where billing's share of the loop goes.

    .venv/bin/python benchmarks/loop_bytecodes.py [--requests 600] [--top 30]

``billing_instructions.py`` counts machine instructions per thread, which says how much
billing costs but not where. This runs the ``gateway_overhead.py`` stack (billing off,
then on) with the gateway under an opcode tracer (``sys.settrace`` with
``f_trace_opcodes``, on the event loop's thread only, about 50x slower), switched on for
``--requests`` requests at concurrency 8 after a warm-up, and prints the bytecodes per
request of each function that billing changes, and the total of the project's own
functions (the interpreter's and libraries' share moves with how requests batch into
steps of the loop, which the tracer's slowness changes).

A bytecode is not a unit of time (a call or an allocation is dearer than a load), but the
counts are exact for the same code and requests, so two versions compare below the noise
of the timed benchmarks; ``PYTHONPATH=<an exported tree>/src`` measures another revision.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import runpy
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from gateway_overhead import RESULTS, closed_loop, git_state, raw_request, start_stack  # noqa: E402

# The project's own functions, and the ``__init__`` of its dataclasses (compiled from a
# string); the rest is the interpreter's and the libraries' (see the docstring).
OWN = ("swarmgate/", "<string>:")


def _serve_traced(argv: list[str]) -> None:
    """The gateway under the tracer: SIGUSR1 starts counting, SIGUSR2 stops and writes
    the counts to ``$LOOP_BYTECODES_OUT``."""
    counts: collections.Counter[CodeType] = collections.Counter()

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "opcode":
            counts[frame.f_code] += 1
        return local

    def begin(frame: FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        return local

    def start(*_: Any) -> None:
        counts.clear()
        sys.settrace(begin)

    def stop(*_: Any) -> None:
        sys.settrace(None)
        out: dict[str, int] = collections.defaultdict(int)
        for code, n in counts.items():
            name = code.co_filename.split("site-packages/")[-1].split("/src/")[-1]
            out[f"{name}:{code.co_firstlineno}:{code.co_name}"] += n
        Path(os.environ["LOOP_BYTECODES_OUT"]).write_text(json.dumps(out))

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    assert argv[0] == "-m", "run as: loop_bytecodes.py --serve <python> -m <module> ..."
    sys.argv = argv[1:]
    runpy.run_module(argv[1], run_name="__main__", alter_sys=True)


def measure(billing: bool, requests: int, warmup: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="swarmgate-bytecodes-") as tmp:
        out = Path(tmp) / "counts.json"
        stack = start_stack(
            Path(tmp),
            floor=False,
            extra_env={
                "SWARMGATE_BILLING_ENABLED": "true" if billing else "false",
                "LOOP_BYTECODES_OUT": str(out),
            },
            wrap=[sys.executable, str(Path(__file__).resolve()), "--serve"],
            up_timeout=120,
        )
        try:
            pid = stack.pid("gateway")
            payload = raw_request(stack.gateway_port, stack.api_key, False)
            asyncio.run(closed_loop(stack.gateway_port, payload, 8, n=warmup))
            os.kill(pid, signal.SIGUSR1)
            time.sleep(0.5)  # the handler runs at the loop's next bytecode
            run = asyncio.run(closed_loop(stack.gateway_port, payload, 8, n=requests))
            os.kill(pid, signal.SIGUSR2)
            deadline = time.monotonic() + 30
            while not out.exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            counts = json.loads(out.read_text())
        finally:
            stack.stop()
    ok = len(run.latencies)
    print(f"billing {'on' if billing else 'off'}: {ok} requests, {run.errors} errors", flush=True)
    return {name: n / ok for name, n in counts.items()}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--serve":
        _serve_traced(argv[2:])  # drops the interpreter's path
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    off = measure(False, args.requests, args.warmup)
    on = measure(True, args.requests, args.warmup)
    names = set(on) | set(off)
    diff = {name: on.get(name, 0.0) - off.get(name, 0.0) for name in names}
    own = {name: d for name, d in diff.items() if name.startswith(OWN)}
    print(f"\n{'on - off':>9}  {'on':>7}  function (bytecodes per request)")
    for name, d in sorted(own.items(), key=lambda item: -abs(item[1]))[: args.top]:
        print(f"{d:+9.1f}  {on.get(name, 0.0):7.1f}  {name}")
    total_own = sum(own.values())
    total = sum(on.values()) - sum(off.values())
    print(
        f"\nbilling adds {total_own:,.0f} bytecodes per request in the project's functions "
        f"({total:+,.0f} in all; off: {sum(off.values()):,.0f} in all)"
    )
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = RESULTS / f"loop_bytecodes-{stamp}.json"
    path.write_text(
        json.dumps({"git": git_state(), "requests": args.requests, "off": off, "on": on}, indent=1)
    )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
