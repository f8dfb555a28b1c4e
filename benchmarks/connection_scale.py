"""How many connected devices one gateway holds: memory per connection, heartbeat CPU.

    .venv/bin/python benchmarks/connection_scale.py                      # 10,000 devices (~3 min)
    .venv/bin/python benchmarks/connection_scale.py --devices 2000 --idle-s 30

One ``swarmgate serve`` process (SQLite, default heartbeat interval of 5 s) and one
``swarmgate simulate --devices N`` process holding N ``sim`` devices, each with its own
WebSocket connection and device token. Reported from the gateway process (``psutil``):

* resident memory before any device and with all N connected and idle; their difference
  divided by N is the memory per connection (registry entry, profile, WebSocket, its
  reader and writer tasks, buffers);
* CPU over ``--idle-s`` seconds while the N devices only send heartbeats, as a share of
  one core and per heartbeat;
* how long the N devices took to connect (registration of the tokens excluded).

Target (issue 11): at most 1 GiB for 10,000 devices. Results also go to
``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psutil

ADMIN = "connection-scale-admin-token-0123456789"
MIB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(base: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit("the gateway did not become ready")


def connected(base: str) -> int | None:
    """Devices the gateway holds, or None when it did not answer within 30 s (busy
    accepting a storm of connections)."""
    try:
        return int(httpx.get(f"{base}/readyz", timeout=30).json().get("devices", 0))
    except httpx.HTTPError:
        return None


def main(args: argparse.Namespace) -> None:
    swarmgate = str(Path(sys.executable).with_name("swarmgate"))
    with tempfile.TemporaryDirectory() as data_dir:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        env = {
            **os.environ,
            "SWARMGATE_DATA_DIR": data_dir,
            "SWARMGATE_ADMIN_TOKEN": ADMIN,
            "SWARMGATE_PORT": str(port),
            "SWARMGATE_CANARY_INTERVAL_S": "0",
            "SWARMGATE_LOG_LEVEL": "WARNING",
        }
        gateway = subprocess.Popen(
            [swarmgate, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        simulate = None
        try:
            wait_ready(base)
            process = psutil.Process(gateway.pid)
            time.sleep(2)
            rss_before = process.memory_info().rss
            simulate = subprocess.Popen(
                [
                    swarmgate,
                    "simulate",
                    "--gateway",
                    base,
                    "--admin-token",
                    ADMIN,
                    "--devices",
                    str(args.devices),
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            started = time.monotonic()
            first_seen = None
            slow_polls = 0
            while (count := connected(base)) != args.devices:
                if count is None:
                    slow_polls += 1
                    continue
                if first_seen is None and count > 0:
                    first_seen = time.monotonic()
                if simulate.poll() is not None:
                    raise SystemExit(f"simulate exited with {simulate.returncode} at {count}")
                if time.monotonic() - started > args.timeout_s:
                    raise SystemExit(f"only {count} of {args.devices} devices connected")
                time.sleep(0.5)
            connect_s = time.monotonic() - (first_seen or started)
            time.sleep(args.settle_s)
            rss_after = process.memory_info().rss
            cpu_before = process.cpu_times()
            wall_before = time.monotonic()
            time.sleep(args.idle_s)
            cpu_after = process.cpu_times()
            wall = time.monotonic() - wall_before
            still = connected(base)
            print(f"(/readyz polls slower than 30 s while connecting: {slow_polls})")
        finally:
            if simulate is not None:
                simulate.send_signal(signal.SIGTERM)
                try:
                    simulate.wait(30)
                except subprocess.TimeoutExpired:
                    simulate.kill()
            gateway.send_signal(signal.SIGTERM)
            try:
                gateway.wait(30)
            except subprocess.TimeoutExpired:
                gateway.kill()
    cpu = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
    heartbeats = args.devices * wall / args.heartbeat_s
    per_connection = (rss_after - rss_before) / args.devices
    result = {
        "devices": args.devices,
        "connected_after_idle": still,
        "rss_before_mib": rss_before / MIB,
        "rss_after_mib": rss_after / MIB,
        "per_connection_kib": per_connection / 1024,
        "projected_10k_mib": (rss_before + per_connection * 10_000) / MIB,
        "connect_s": connect_s,
        "idle_cpu_share": cpu / wall,
        "cpu_per_heartbeat_us": cpu / heartbeats * 1e6,
    }
    print(f"devices connected: {args.devices} (still connected after the idle window: {still})")
    print(
        f"gateway RSS: {result['rss_before_mib']:.0f} MiB before, {result['rss_after_mib']:.0f} MiB with all connected"
    )
    print(
        f"memory per connection: {result['per_connection_kib']:.1f} KiB; 10,000 devices: {result['projected_10k_mib']:.0f} MiB (target 1,024)"
    )
    print(f"connecting took {connect_s:.1f} s")
    print(
        f"idle ({args.idle_s:.0f} s, heartbeats every {args.heartbeat_s:.0f} s): "
        f"{result['idle_cpu_share'] * 100:.1f} % of a core, "
        f"{result['cpu_per_heartbeat_us']:.0f} us per heartbeat"
    )
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (out / f"connection_scale-{stamp}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--idle-s", type=float, default=60.0)
    parser.add_argument("--settle-s", type=float, default=10.0)
    parser.add_argument("--heartbeat-s", type=float, default=5.0, help="the gateway's interval")
    parser.add_argument("--timeout-s", type=float, default=600.0)
    main(parser.parse_args())
