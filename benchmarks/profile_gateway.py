"""Where the gateway's CPU goes per request, under the concurrency-64 load.

    .venv/bin/python benchmarks/profile_gateway.py [--seconds 15] [--stream] [--rate 250]

Starts the same stack as ``gateway_overhead.py`` (gateway on core 0; sim node and load
generator on core 1), drives it at concurrency 64 and samples the gateway process with
py-spy (``pip install py-spy`` into the venv). Prints the functions with the most
inclusive and self samples, both as a share of the gateway's busy samples and as
microseconds of gateway CPU per request, and writes the raw collapsed stacks (flame
graph input) and a speedscope file to ``benchmarks/results/``.

Without py-spy it falls back to nothing clever: it says so and exits with 2.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gateway_overhead as bench

# Grouping frames by where they live, to see which layer costs what.
LAYERS = (
    ("swarmgate", "/swarmgate/"),
    ("sqlalchemy/aiosqlite", "/sqlalchemy/"),
    ("sqlalchemy/aiosqlite", "/aiosqlite/"),
    ("pydantic", "/pydantic"),
    ("fastapi", "/fastapi/"),
    ("starlette", "/starlette/"),
    ("uvicorn", "/uvicorn/"),
    ("websockets", "/websockets/"),
    ("logging", "/logging/"),
    ("asyncio", "/asyncio/"),
)


# Where a sample's time belongs on the request path: the innermost frame (leaf first) that
# matches one of these names decides.
BUCKETS = (
    (
        "job log (batched SQLite writes)",
        ("JobLog", "_insert_many_sqlite", "aiosqlite/", "sqlalchemy/"),
    ),
    ("device link: WebSocket frames in/out", ("api/nodes.py", "websockets/", "websockets_")),
    (
        "dispatch: pick device, attempt, failover bookkeeping",
        ("routing/dispatch.py", "routing/registry.py", "routing/states.py"),
    ),
    ("request body: read + validate", ("parse_body", "read_body")),
    ("auth: API key check", ("verifier", "KeyVerifier", "digest_of", "parse_bearer")),
    (
        "handler: spec, response JSON, disconnect watch",
        ("api/chat.py", "api/running.py", "api/responses.py", "api/hotpath.py"),
    ),
    ("response send (Starlette Response)", ("starlette/responses.py",)),
    ("HTTP server (uvicorn + httptools)", ("uvicorn/protocols/http",)),
    ("framework (FastAPI/Starlette, non-hot routes)", ("fastapi/", "starlette/")),
)


def bucket_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, markers in BUCKETS:
            if any(marker in frame for marker in markers):
                return name
    return "event loop, GC, other"


def layer_of(frame: str) -> str:
    for name, marker in LAYERS:
        if marker in frame:
            return name
    return "other"


def parse_collapsed(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        stack, _, count = line.rpartition(" ")
        stacks.append((stack.split(";"), int(count)))
    return stacks


def report(
    stacks: list[tuple[list[str], int]], cpu_us_per_req: float, top: int, target: str = "gateway"
) -> str:
    total = sum(c for _, c in stacks)
    inclusive: collections.Counter[str] = collections.Counter()
    self_: collections.Counter[str] = collections.Counter()
    layers: collections.Counter[str] = collections.Counter()
    buckets: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    for frames, count in stacks:
        if frames and frames[0].startswith(("thread ", "process ")):
            threads[frames[0]] += count
            frames = frames[1:]
        if frames and frames[0].startswith("thread "):
            threads[frames[0]] += count
            frames = frames[1:]
        for frame in set(frames):
            inclusive[frame] += count
        buckets[bucket_of(frames)] += count
        if frames:
            self_[frames[-1]] += count
            # The innermost frame that is not the event loop machinery names the layer.
            layers[layer_of(frames[-1])] += count

    def line(frame: str, count: int) -> str:
        share = count / total
        return f"{share:6.1%} {share * cpu_us_per_req:7.0f} us/req  {frame}"

    out = [f"{total} busy samples; {target} CPU {cpu_us_per_req:.0f} us/request", ""]
    if threads:
        out.append("by thread:")
        out += [line(t, c) for t, c in threads.most_common()]
        out.append("")
    out.append("by part of the request path:")
    out += [line(name, c) for name, c in buckets.most_common()]
    out.append("")
    out.append("self time by layer (innermost frame):")
    out += [line(name, c) for name, c in layers.most_common()]
    out += ["", f"top {top} inclusive:"]
    out += [line(f, c) for f, c in inclusive.most_common(top)]
    out += ["", f"top {top} self:"]
    out += [line(f, c) for f, c in self_.most_common(top)]
    return "\n".join(out)


def start_mock(data_dir: Path) -> tuple[subprocess.Popen[bytes], dict[str, str]]:
    """``litellm_compare.py``'s mock OpenAI upstream on core 1, and the gateway settings
    that make it the cloud model's upstream."""
    import json

    import litellm_compare as cloud

    port = bench.free_port()
    completion, frames = cloud.mock_answers(data_dir)
    proc = subprocess.Popen(
        [
            *bench.taskset(bench.CLIENT_CORE),
            sys.executable,
            str(Path(__file__).resolve().parent / "floor_app.py"),
            str(port),
            str(completion),
            str(frames),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    upstream = [{"name": cloud.cloud_upstream_name(), "base_url": f"http://127.0.0.1:{port}/v1"}]
    upstream[0]["api_key"] = cloud.MOCK_KEY
    return proc, {"SWARMGATE_UPSTREAMS": json.dumps(upstream)}


async def drive(
    stack: bench.Stack,
    seconds: float,
    stream: bool,
    concurrency: int,
    pyspy: list[str],
    target: str = "gateway",
    model: str = bench.MODEL,
) -> tuple[bench.Run, float]:
    payload = bench.raw_request(stack.gateway_port, stack.api_key, stream)
    if model != bench.MODEL:
        body = bench.request_body(stream)
        payload = payload.replace(body, body.replace(bench.MODEL.encode(), model.encode()))
        old = f"Content-Length: {len(body)}".encode()
        new = f"Content-Length: {len(payload) - payload.index(b'{')}".encode()
        payload = payload.replace(old, new)
    await bench.closed_loop(stack.gateway_port, payload, concurrency, duration=2.0)  # warm-up
    proc = subprocess.Popen(pyspy)
    await asyncio.sleep(0.5)
    with bench.cpu_meter({target: stack.pid(target)}) as cpu:
        run = await bench.closed_loop(stack.gateway_port, payload, concurrency, duration=seconds)
    proc.wait(60)
    return run, cpu[target]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument(
        "--cloud",
        action="store_true",
        help="the cloud path: requests for litellm_compare.py's cloud model, answered by its "
        "mock upstream (core 1) instead of the sim device",
    )
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument(
        "--all-threads",
        action="store_true",
        help="sample every thread, not only the one holding the GIL (idle worker threads "
        "then show up as busy)",
    )
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an environment variable for the gateway (e.g. SWARMGATE_BILLING_ENABLED=false "
        "to profile without billing); repeatable",
    )
    parser.add_argument("--whatif", help="profile benchmarks/gateway_whatif.py PATCHES instead")
    parser.add_argument(
        "--target",
        choices=["gateway", "node"],
        default="gateway",
        help="which process to sample: the gateway, or the sim node (core 1)",
    )
    parser.add_argument(
        "--report",
        nargs=2,
        metavar=("COLLAPSED", "CPU_US_PER_REQ"),
        help="only analyse an existing collapsed-stack file",
    )
    args = parser.parse_args()
    if args.report:
        print(report(parse_collapsed(Path(args.report[0])), float(args.report[1]), args.top))
        return 0
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        print("py-spy is not installed: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(0, {bench.CLIENT_CORE})
    bench.exit_on_sigterm()
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    kind = (
        args.target
        + "-"
        + ("stream" if args.stream else "plain")
        + ("-cloud" if args.cloud else "")
        + (f"-whatif-{args.whatif.replace(',', '+')}" if args.whatif else "")
    )
    bench.RESULTS.mkdir(parents=True, exist_ok=True)
    raw = bench.RESULTS / f"profile-{kind}-{stamp}.collapsed"
    data_dir = Path(tempfile.mkdtemp(prefix="swarmgate-prof-"))
    stack = None
    mock = None
    try:
        extra_env = dict(item.split("=", 1) for item in args.env)
        model = bench.MODEL
        if args.cloud:
            import litellm_compare as cloud

            mock, mock_env = start_mock(data_dir)
            extra_env.update(mock_env)
            model = cloud.CLOUD_MODEL
        stack = bench.start_stack(data_dir, whatif=args.whatif, extra_env=extra_env)
        gil = not args.all_threads
        cmd = [
            pyspy,
            "record",
            "--pid",
            str(stack.pid(args.target)),
            "--rate",
            str(args.rate),
            "--duration",
            str(int(args.seconds)),
            "--threads",
            *(["--gil"] if gil else []),
            "--format",
            "raw",
            "--output",
            str(raw),
        ]
        import uvloop

        run, cpu_s = uvloop.run(
            drive(stack, args.seconds + 1, args.stream, args.concurrency, cmd, args.target, model)
        )
    finally:
        if stack is not None:
            stack.stop()
        if mock is not None:
            mock.terminate()
            mock.wait(10)
        shutil.rmtree(data_dir, ignore_errors=True)
    summary = bench.summarize(run)
    ok = summary["requests"]
    cpu_us = cpu_s / ok * 1e6 if ok else float("nan")
    print(
        f"\n{kind}, concurrency {args.concurrency}: {summary['rps']:.0f} req/s, "
        f"p50 {summary['p50_ms']:.2f} ms, p99 {summary['p99_ms']:.2f} ms, "
        f"errors {summary['errors']}, {args.target} CPU {cpu_us:.0f} us/req "
        f"(py-spy sampling adds a little)\n"
    )
    text = report(parse_collapsed(raw), cpu_us, args.top, args.target)
    print(text)
    (raw.with_suffix(".txt")).write_text(text + "\n")
    print(f"\ncollapsed stacks: {raw.relative_to(bench.ROOT)}")
    return 0


if __name__ == "__main__":
    time.sleep(0)
    raise SystemExit(main())
