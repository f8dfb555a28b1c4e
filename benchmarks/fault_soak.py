"""Fault soak: one gateway, a fleet of misbehaving simulated devices, steady load.

    .venv/bin/python benchmarks/fault_soak.py             # full soak (10 minutes of load)
    .venv/bin/python benchmarks/fault_soak.py --quick     # smoke run (1 minute of load)
    .venv/bin/python benchmarks/fault_soak.py --recheck DIR   # the checks again, on a kept run

Each run takes about 15 s more than its load (start, drain, settle, stop).

What runs where (2-core box):

* core 0: ``swarmgate serve`` (one process, SQLite in a temporary data dir, billing on);
* core 1: ``swarmgate simulate --mix healthy=4,slow=2,flaky=2,dying=2,hanging=1 --slots 2
  --sim-ttft-ms 100 --sim-tokens-per-s 100`` and this process, the load generator. The
  profiles are ``swarmgate/simulate.py``'s: slow answers late and slowly (400 ms, 25
  tokens/s), flaky fails 30 % of its jobs at once, dying drops its whole connection
  after 3 tokens (then reconnects), hanging takes jobs and never answers.

Load: an open loop at a fixed rate (default 30 requests/s, about what the healthy devices
can carry alone, so the others keep getting work: the router cools a failing device down
and uses it only when the better ones are busy) with at most ``--max-in-flight`` requests
out at once (a send due while the cap is reached is skipped and counted), half of them
streamed, ``max_tokens`` drawn from 8/16/32, over httpx keep-alive connections. Each
request ends in one of: ``completed`` (a 200 answer, or a stream that ends with
``[DONE]``), ``failed`` (an error status with an OpenAI-style envelope), ``stream_failed``
(a stream that ends with an error event), or an anomaly: ``timeout`` (no end within
``--client-timeout``), ``transport`` (the connection broke), ``stream_cut`` (a stream that
ended without ``[DONE]`` or an error), ``bad_response`` (a body that is neither). The
gateway's failover hides most faults from clients; ``--gateway-env
SWARMGATE_MAX_RETRIES=0`` (one attempt per request) lets them through, to soak the
failure paths too.

The soak model's catalog prices are multiplied by ``--price-multiplier`` (default 1000):
at the shipped prices a sim answer costs the 1 micro-dollar minimum and the provider's
85 % of it rounds down to nothing. The gateway suspends a device after repeated failed
jobs; every ``--clear-every`` seconds the script clears suspended devices through the
admin API, so the fault mix stays in play (``--clear-every 0`` lets suspensions stand).

The gateway's RSS and CPU are sampled every ``--sample-every`` seconds. After the load,
the script waits for the gateway's open holds (``/metrics``) to reach zero, reads
``/v1/usage``, stops the devices and then the gateway (SIGTERM: graceful, so the job log
and the charge journal are flushed), and checks, against the gateway's own SQLite file:

* each faulty profile still failed attempts late in the load (else the soak tested little);
* every request completed or failed with an error envelope, no HTTP 500, every error
  code (and its status) as documented in the tree at the top of ``swarmgate/errors.py``;
* every completed request was charged exactly once (``charges.job_id`` is the ``id`` the
  answer carried; a stream continued on another device also has ``<id>.<n>`` part
  charges), and no other request was charged; the job log's completed jobs are exactly
  the completed requests;
* no hold is left open (in memory: ``swarmgate_holds_open``; in the ledger: ``holds``),
  the charge journal is drained, each ledger transaction's entries sum to zero, all
  balances sum to zero and agree with the entries, no book is below zero, the developer
  paid exactly the sum of the charges and the providers and the platform earned their
  shares, ``/v1/usage`` agrees with the ``charges`` rows;
* the gateway exited cleanly, and its RSS did not grow by more than
  ``--rss-growth-limit-mib``: the median of the last window of the load (a minute, or a
  quarter of the load if shorter) against the median of the second window.

Results go to ``benchmarks/results/fault_soak-<time>.json``; a markdown table and the
checks are printed. The exit status is 1 when a check failed; the data dir (gateway and
device logs, database, every request's outcome in ``soak-state.json``) is then kept
(``--keep`` keeps it anyway), and ``--recheck DIR`` runs the checks on it again.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from gateway_overhead import (  # noqa: E402
    ADMIN_TOKEN,
    MODEL,
    RESULTS,
    ROOT,
    Stack,
    _get_json,
    admin,
    cpu_meter,
    exit_on_sigterm,
    free_port,
    git_state,
    machine,
    pct,
    swarmgate,
    taskset,
    wait_until,
)

from swarmgate import errors  # noqa: E402
from swarmgate.routing.profile import COOLDOWN_CAP_S  # noqa: E402
from swarmgate.simulate import parse_mix  # noqa: E402

GATEWAY_CORE = 0
CLIENT_CORE = 1  # the simulated devices and this load generator
DEFAULT_MIX = "healthy=4,slow=2,flaky=2,dying=2,hanging=1"
CREDIT_USD = "1000"
MAX_TOKENS_CHOICES = (8, 16, 32)
PROMPT_WORDS = ("swarm", "device", "gateway", "token", "ledger", "stream", "failover")
# Outcomes that are neither an answer nor a documented error: each one fails the soak.
ANOMALIES = ("timeout", "transport", "stream_cut", "bad_response")
STATE_FILE = "soak-state.json"


# -- one request -------------------------------------------------------------------------
@dataclass(slots=True)
class Outcome:
    n: int
    stream: bool
    sent_at: float  # seconds since the load started
    result: str = ""  # completed | failed | stream_failed | one of ANOMALIES
    latency_s: float = 0.0
    status: int | None = None
    code: str | None = None
    job_id: str | None = None  # the answer's "id" (the job id), when any part of it came
    ttft_s: float | None = None  # streams: to the first content chunk
    attempts: int | None = None  # devices tried, from the answer's "swarmgate" block
    continued: int = 0  # devices that took part in a continued stream
    request_id: str | None = None
    detail: str | None = None


def request_body(n: int, stream: bool, rng: random.Random) -> bytes:
    words = " ".join(rng.choice(PROMPT_WORDS) for _ in range(rng.randint(3, 12)))
    return orjson.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": f"Request {n}: say something about {words}."}],
            "max_tokens": rng.choice(MAX_TOKENS_CHOICES),
            "stream": stream,
        }
    )


def _read_error(out: Outcome, content: bytes) -> None:
    """An error answer must be the envelope {"error": {"message", "type", "code", "param"}}."""
    try:
        error = orjson.loads(content)["error"]
        missing = {"message", "type", "code", "param"} - set(error)
        code = error["code"]
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        out.result, out.detail = (
            "bad_response",
            f"not an error envelope ({exc!r}): {content[:200]!r}",
        )
        return
    out.code = code if isinstance(code, str) else repr(code)
    if missing or not isinstance(code, str):
        out.result, out.detail = "bad_response", f"envelope without {sorted(missing)}: {error}"
        return
    out.result = "failed"


def _read_info(out: Outcome, payload: dict[str, Any]) -> None:
    info = payload.get("swarmgate")
    if isinstance(info, dict):
        out.attempts = info.get("attempts")
        out.continued = len(info.get("continued") or ())


def _read_completion(out: Outcome, content: bytes) -> None:
    try:
        payload = orjson.loads(content)
        text = payload["choices"][0]["message"]["content"]
        job_id = payload["id"]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError) as exc:
        out.result, out.detail = "bad_response", f"not a completion ({exc!r}): {content[:200]!r}"
        return
    out.job_id = job_id
    _read_info(out, payload)
    out.result = "completed" if isinstance(text, str) and job_id else "bad_response"


async def _read_stream(out: Outcome, response: httpx.Response, sent: float) -> None:
    async for line in response.aiter_lines():
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            out.result = "completed"
            return
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            out.result, out.detail = "bad_response", f"not JSON: {data[:200]!r}"
            return
        if "error" in payload:
            _read_error(out, data.encode())
            if out.result == "failed":
                out.result = "stream_failed"
            return
        out.job_id = out.job_id or payload.get("id")
        choices = payload.get("choices") or [{}]
        if out.ttft_s is None and (choices[0].get("delta") or {}).get("content"):
            out.ttft_s = time.perf_counter() - sent
        _read_info(out, payload)
    out.result = "stream_cut"


async def one_request(
    client: httpx.AsyncClient, n: int, stream: bool, body: bytes, timeout_s: float, t0: float
) -> Outcome:
    sent = time.perf_counter()
    out = Outcome(n=n, stream=stream, sent_at=sent - t0)
    try:
        async with (
            asyncio.timeout(timeout_s),
            client.stream("POST", "/v1/chat/completions", content=body) as response,
        ):
            out.status = response.status_code
            out.request_id = response.headers.get("x-request-id")
            if response.status_code != 200:
                _read_error(out, await response.aread())
            elif stream:
                await _read_stream(out, response, sent)
            else:
                _read_completion(out, await response.aread())
    except TimeoutError:
        out.result = "timeout"
    except httpx.HTTPError as exc:
        out.result, out.detail = "transport", f"{type(exc).__name__}: {exc}"
    out.latency_s = time.perf_counter() - sent
    return out


# -- the load, and what runs beside it ---------------------------------------------------
@dataclass
class Plan:
    minutes: float
    rate: float
    max_in_flight: int
    stream_share: float
    client_timeout_s: float
    sample_every_s: float
    clear_every_s: float
    seed: int
    mix: str
    slots: int
    sim_ttft_ms: float
    sim_tokens_per_s: float
    price_multiplier: int


@dataclass
class Live:
    """What the load generator and the samplers share while the soak runs."""

    in_flight: int = 0
    finished: int = 0
    skipped: int = 0  # sends due while max_in_flight were out
    late: int = 0  # sends more than 50 ms behind the schedule (the client fell behind)
    outcomes: list[Outcome] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    clears: list[dict[str, Any]] = field(default_factory=list)


async def drive(base: str, key: str, plan: Plan, live: Live, t0: float) -> float:
    """Sends requests on a fixed schedule for ``plan.minutes`` and waits for every one;
    returns the seconds the sending took."""
    rng = random.Random(plan.seed)
    limits = httpx.Limits(
        max_connections=plan.max_in_flight, max_keepalive_connections=plan.max_in_flight
    )
    timeout = httpx.Timeout(plan.client_timeout_s + 5, connect=5)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    tasks: set[asyncio.Task[None]] = set()
    async with httpx.AsyncClient(
        base_url=base, headers=headers, limits=limits, timeout=timeout
    ) as client:

        async def run(n: int, stream: bool, body: bytes) -> None:
            try:
                live.outcomes.append(
                    await one_request(client, n, stream, body, plan.client_timeout_s, t0)
                )
            finally:
                live.in_flight -= 1
                live.finished += 1

        total = int(plan.minutes * 60 * plan.rate)
        for n in range(total):
            delay = t0 + n / plan.rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -0.05:
                live.late += 1
            stream = rng.random() < plan.stream_share
            body = request_body(n, stream, rng)
            if live.in_flight >= plan.max_in_flight:
                live.skipped += 1
                continue
            live.in_flight += 1
            task = asyncio.create_task(run(n, stream, body))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        sending_s = time.perf_counter() - t0
        while tasks:
            await asyncio.gather(*list(tasks))
    return sending_s


async def sample(
    procs: dict[str, psutil.Process], live: Live, every: float, t0: float, stop: asyncio.Event
) -> None:
    """RSS (MiB) and CPU seconds of each process, with the load's progress, every ``every`` s."""
    while True:
        row: dict[str, Any] = {
            "t": round(time.perf_counter() - t0, 2),
            "in_flight": live.in_flight,
            "finished": live.finished,
        }
        for name, proc in procs.items():
            with contextlib.suppress(psutil.Error):
                row[f"{name}_rss_mib"] = round(proc.memory_info().rss / 2**20, 2)
                row[f"{name}_cpu_s"] = round(sum(proc.cpu_times()[:2]), 2)
        live.samples.append(row)
        if stop.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)


async def keep_faults(
    admin_client: httpx.AsyncClient, live: Live, every: float, t0: float, stop: asyncio.Event
) -> None:
    """Clears suspended devices every ``every`` seconds, so the faults go on."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)
        if stop.is_set():
            return
        try:
            devices = (await admin_client.get("/admin/devices")).json()["data"]
            for device in devices:
                reason = (device.get("connection") or {}).get("suspended_reason")
                if reason:
                    response = await admin_client.post(f"/admin/devices/{device['id']}/clear")
                    live.clears.append(
                        {
                            "t": round(time.perf_counter() - t0, 1),
                            "device": device["name"],
                            "reason": reason,
                            "status": response.status_code,
                        }
                    )
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            live.clears.append({"t": round(time.perf_counter() - t0, 1), "error": repr(exc)})


# -- the processes -----------------------------------------------------------------------
@dataclass
class Fleet:
    stack: Stack
    base: str
    developer_id: str
    credit_micros: int
    profiles: list[str]


def priced_catalog(data_dir: Path, multiplier: int) -> Path:
    """The shipped catalog with the soak model's prices times ``multiplier``: at catalog
    prices a sim answer costs the 1 micro-dollar minimum and a provider's 85 % of it
    rounds down to nothing, which would leave the money checks little to check."""
    catalog = orjson.loads(resources.files("swarmgate").joinpath("catalog.json").read_bytes())
    for model in catalog["models"]:
        if model["id"] == MODEL:
            model["pricing"] = {k: v * multiplier for k, v in model["pricing"].items()}
    path = data_dir / "catalog.json"
    path.write_bytes(orjson.dumps(catalog))
    return path


def start_fleet(data_dir: Path, plan: Plan, extra_env: dict[str, str]) -> Fleet:
    """``swarmgate serve`` on core 0 and ``swarmgate simulate`` on core 1, devices connected."""
    env = {
        **os.environ,
        "SWARMGATE_DATA_DIR": str(data_dir),
        "SWARMGATE_ADMIN_TOKEN": ADMIN_TOKEN,
        "SWARMGATE_LOG_LEVEL": "WARNING",
        "SWARMGATE_CATALOG_PATH": str(priced_catalog(data_dir, plan.price_multiplier)),
        **extra_env,
    }
    developer = admin(env, "accounts", "create", "--name", "soak-dev", "--credits", CREDIT_USD)
    key = admin(env, "keys", "create", "--account", developer["id"])["key"]
    port = free_port()
    stack = Stack(data_dir, env, port, 0, key, "")
    base = f"http://127.0.0.1:{port}"
    profiles = parse_mix(plan.mix, 0)
    try:
        stack.procs["gateway"] = subprocess.Popen(
            [*taskset(GATEWAY_CORE), *swarmgate("serve")],
            env={**env, "SWARMGATE_PORT": str(port)},
            stdout=(data_dir / "gateway.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        wait_until(lambda: _get_json(f"{base}/healthz") is not None, "gateway up", stack)
        stack.procs["simulate"] = subprocess.Popen(
            [
                *taskset(CLIENT_CORE),
                *swarmgate(
                    "--log-level",
                    "WARNING",
                    "simulate",
                    "--gateway",
                    base,
                    "--admin-token",
                    ADMIN_TOKEN,
                    "--model",
                    MODEL,
                    "--mix",
                    plan.mix,
                    "--slots",
                    str(plan.slots),
                    "--sim-ttft-ms",
                    str(plan.sim_ttft_ms),
                    "--sim-tokens-per-s",
                    str(plan.sim_tokens_per_s),
                ),
            ],
            env=env,
            stdout=(data_dir / "simulate.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        wait_until(
            lambda: (_get_json(f"{base}/readyz") or {}).get("devices", 0) >= len(profiles),
            f"{len(profiles)} simulated devices connected",
            stack,
            timeout=60,
        )
    except BaseException:
        stack.stop()
        raise
    return Fleet(stack, base, developer["id"], int(CREDIT_USD) * 1_000_000, profiles)


def stop_gracefully(proc: subprocess.Popen[bytes], timeout: float = 60) -> dict[str, Any]:
    started = time.monotonic()
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        rc: int | None = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = None
    return {"returncode": rc, "stop_s": round(time.monotonic() - started, 2)}


def holds_open(base: str) -> int | None:
    try:
        text = httpx.get(f"{base}/metrics", timeout=5).text
    except httpx.HTTPError:
        return None
    found = re.search(r"^swarmgate_holds_open (\d+)$", text, re.MULTILINE)
    return int(found.group(1)) if found else None


def settle_and_read(fleet: Fleet, wait_s: float = 60) -> dict[str, Any]:
    """After the load: waits for the in-memory holds to reach zero, then reads what the
    API says (usage, devices) while the gateway still runs."""
    deadline = time.monotonic() + wait_s
    opened = holds_open(fleet.base)
    while opened and time.monotonic() < deadline:
        time.sleep(0.5)
        opened = holds_open(fleet.base)
    admin_headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    usage = httpx.get(
        f"{fleet.base}/v1/usage",
        headers={"Authorization": f"Bearer {fleet.stack.api_key}"},
        timeout=30,
    ).json()
    devices = httpx.get(f"{fleet.base}/admin/devices", headers=admin_headers, timeout=30).json()
    return {"holds_open": opened, "usage": usage, "devices": device_summary(devices, fleet)}


def device_summary(devices: dict[str, Any], fleet: Fleet) -> list[dict[str, Any]]:
    out = []
    for device in devices.get("data", []):
        name = device.get("name", "")
        index = int(name[4:]) if name.startswith("sim-") and name[4:].isdigit() else -1
        live = device.get("connection") or {}
        out.append(
            {
                "name": name,
                "profile": fleet.profiles[index] if 0 <= index < len(fleet.profiles) else "?",
                "connected": bool(live),
                "jobs_served": live.get("jobs_served"),
                "trust_score": live.get("trust_score"),
                "suspended_reason": live.get("suspended_reason"),
            }
        )
    return out


# -- the checks --------------------------------------------------------------------------
@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def documented_codes() -> list[tuple[re.Pattern[str], int, str]]:
    """(code pattern, status, class) for each code in the tree at the top of errors.py;
    ``NO_..._DEVICE`` and ``ATTESTATION_<REASON>`` stand for families of codes."""
    tree = re.compile(r"(?:├──|└──)\s+(\w+)\s+(\d{3})\b([^(\n]*)")
    out = []
    for found in tree.finditer(errors.__doc__ or ""):
        cls, status, codes = found.group(1), int(found.group(2)), found.group(3)
        for token in (t.strip() for t in codes.split("/")):
            if token:
                pattern = re.sub(r"<[A-Z]+>|\\\.\\\.\\\.", "[A-Z0-9_]+", re.escape(token))
                out.append((re.compile(pattern), status, cls))
    return out


def client_checks(outcomes: list[Outcome]) -> tuple[list[Check], dict[str, Any]]:
    tree = documented_codes()
    seen: Counter[tuple[str, int | None]] = Counter(
        (o.code, o.status if o.result == "failed" else None) for o in outcomes if o.code is not None
    )
    undocumented, wrong_status = [], []
    for (code, status), count in sorted(seen.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        matches = [(s, cls) for pattern, s, cls in tree if pattern.fullmatch(code)]
        if not matches:
            undocumented.append(f"{code} x{count}")
        elif status is not None and status not in {s for s, _ in matches}:
            documented = "/".join(f"{s} ({cls})" for s, cls in matches)
            wrong_status.append(f"{code} answered {status} x{count}, documented {documented}")
    anomalies = [o for o in outcomes if o.result in ANOMALIES]
    by_kind = Counter(o.result for o in anomalies)
    server_errors = Counter(o.code for o in outcomes if o.status == 500)
    faulted = sum(1 for o in outcomes if o.result != "completed" or (o.attempts or 1) > 1)
    checks = [
        Check(
            "every request completed or failed with an error envelope",
            not anomalies,
            "none left hanging or malformed"
            if not anomalies
            else ", ".join(f"{k} {v}" for k, v in by_kind.items()),
        ),
        Check(
            "every error code is in the tree of errors.py",
            not undocumented,
            "; ".join(undocumented) or f"{len(seen)} distinct code/status pairs, all listed",
        ),
        Check(
            "every error status is the documented one",
            not wrong_status,
            "; ".join(wrong_status) or "all match",
        ),
        Check(
            "no HTTP 500",
            not server_errors,
            ", ".join(f"{c} x{n}" for c, n in server_errors.items()) or "none",
        ),
        Check(
            "the faults were exercised (failovers or failures)",
            faulted > 0,
            f"{faulted} requests failed or needed more than one device",
        ),
    ]
    facts = {
        "undocumented_codes": undocumented,
        "status_mismatches": wrong_status,
        "anomalies": [asdict(o) for o in anomalies[:50]],
    }
    return checks, facts


def base_job_id(job_id: str) -> str:
    """A continued stream's earlier parts are charged as ``<job id>.<n>``."""
    return re.sub(r"\.\d+$", "", job_id)


def book_checks(
    db_path: Path, outcomes: list[Outcome], developer_id: str, credit_micros: int, after: dict
) -> tuple[list[Check], dict[str, Any]]:
    """The gateway's books, read from its SQLite file once it has stopped."""
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:

        def rows(sql: str, *params: Any) -> list[tuple[Any, ...]]:
            return db.execute(sql, params).fetchall()

        charged = rows(
            "SELECT job_id, cost_micros, provider_micros, platform_micros, provider_account_id "
            "FROM charges WHERE account_id = ?",
            developer_id,
        )
        jobs = rows("SELECT id, status, error_code FROM jobs WHERE account_id = ?", developer_id)
        open_holds = rows("SELECT count(*) FROM holds WHERE status = 'open'")[0][0]
        journal, journal_failed = rows("SELECT count(*), count(failed_at) FROM charge_journal")[0]
        journal += len(list(db_path.with_name(f"{db_path.name}-charges").glob("*.log")))
        unbalanced = rows(
            "SELECT transaction_id, sum(amount_micros) FROM ledger_entries "
            "GROUP BY transaction_id HAVING sum(amount_micros) != 0"
        )
        transactions = rows("SELECT count(*) FROM ledger_transactions")[0][0]
        books = dict(rows("SELECT book, amount_micros FROM balances"))
        from_entries = dict(
            rows("SELECT book, sum(amount_micros) FROM ledger_entries GROUP BY book")
        )
    finally:
        db.close()

    completed = [o.job_id for o in outcomes if o.result == "completed" and o.job_id]
    completed_ids = set(completed)
    known_failed = {o.job_id for o in outcomes if o.result != "completed" and o.job_id}
    charge_ids = Counter(job_id for job_id, *_ in charged)
    charged_bases = {base_job_id(job_id) for job_id in charge_ids}
    not_charged = sorted(completed_ids - set(charge_ids))
    twice = sorted(j for j in completed_ids if charge_ids[j] > 1)
    wrongly_charged = sorted(charged_bases - completed_ids)
    job_status = {job_id: status for job_id, status, _ in jobs}
    completed_jobs = {job_id for job_id, status in job_status.items() if status == "completed"}
    charged_unfinished = sorted(b for b in charged_bases if job_status.get(b) != "completed")

    cost = sum(c[1] for c in charged)
    provider_owed: Counter[str] = Counter()
    for _job, _cost, provider, _platform, provider_id in charged:
        if provider_id:
            provider_owed[f"provider:{provider_id}"] += provider
    platform_owed = sum(c[3] for c in charged)
    developer_book = books.get(f"developer:{developer_id}", 0)
    provider_books = {b: v for b, v in books.items() if b.startswith("provider:") and v}
    nonzero = {b: v for b, v in books.items() if v}
    drift = {
        b: (v, from_entries.get(b, 0))
        for b, v in {**nonzero, **{b: books.get(b, 0) for b in from_entries}}.items()
        if v != from_entries.get(b, 0)
    }
    negative = {b: v for b, v in books.items() if v < 0 and not b.startswith("external:")}
    usage = after.get("usage") or {}
    usage_pair = (usage.get("total_requests"), usage.get("total_cost_micros"))

    checks = [
        Check(
            "every completed request was charged exactly once",
            not not_charged and not twice and len(completed) == len(completed_ids),
            f"{len(completed_ids)} completed, {len(not_charged)} without a charge, "
            f"{len(twice)} charged twice, {len(completed) - len(completed_ids)} ids repeated"
            + (f"; e.g. {not_charged[:3]}" if not_charged else ""),
        ),
        Check(
            "no failed request was charged",
            not wrongly_charged and not charged_unfinished,
            f"{len(charge_ids)} charge rows for {len(charged_bases)} jobs; "
            f"{len(wrongly_charged)} not answered to the client "
            f"({len(set(wrongly_charged) & known_failed)} of them seen failing by the client), "
            f"{len(charged_unfinished)} whose job did not complete"
            + (f"; e.g. {wrongly_charged[:3]}" if wrongly_charged else ""),
        ),
        Check(
            "the job log's completed jobs are the completed requests",
            completed_jobs == completed_ids,
            f"{len(completed_jobs)} completed jobs, {len(completed_ids)} completed requests, "
            f"{len(completed_jobs ^ completed_ids)} differ; job rows by status: "
            + ", ".join(f"{s} {n}" for s, n in sorted(Counter(job_status.values()).items())),
        ),
        Check(
            "no hold left open",
            after.get("holds_open") == 0 and open_holds == 0 and not usage.get("held_micros"),
            f"in memory (swarmgate_holds_open) {after.get('holds_open')}, in the ledger "
            f"{open_holds}, /v1/usage held_micros {usage.get('held_micros')}",
        ),
        Check(
            "the charge journal is drained",
            journal == 0,
            f"{journal} rows and files left ({journal_failed} refused by the ledger)",
        ),
        Check(
            "each ledger transaction's entries sum to zero",
            not unbalanced,
            f"{transactions} transactions, {len(unbalanced)} unbalanced"
            + (f": {unbalanced[:3]}" if unbalanced else ""),
        ),
        Check(
            "all balances sum to zero",
            sum(books.values()) == 0,
            f"{len(books)} books, sum {sum(books.values())}",
        ),
        Check(
            "balances agree with the ledger entries",
            not drift,
            f"{len(drift)} books drifted" + (f": {dict(list(drift.items())[:3])}" if drift else ""),
        ),
        Check("no book below zero (but external:)", not negative, str(negative or "none")),
        Check(
            "the developer paid exactly the charges; providers and platform got their shares",
            credit_micros - developer_book == cost
            and provider_books == {b: v for b, v in provider_owed.items() if v}
            and books.get("platform:revenue", 0) == platform_owed,
            f"credit {credit_micros} - balance {developer_book} = "
            f"{credit_micros - developer_book}, charges {cost}; providers "
            f"{sum(provider_books.values())} vs owed {sum(provider_owed.values())}; platform "
            f"{books.get('platform:revenue', 0)} vs owed {platform_owed}",
        ),
        Check(
            "/v1/usage agrees with the charges (a continued answer is one request)",
            usage_pair == (len(charged_bases), cost),
            f"usage: {usage_pair[0]} requests, {usage_pair[1]} micros; charges table: "
            f"{len(charged)} rows for {len(charged_bases)} requests, {cost} micros",
        ),
    ]
    facts = {
        "charge_rows": len(charged),
        "charged_jobs": len(charged_bases),
        "part_charges": sum(1 for j in charge_ids if j != base_job_id(j)),
        "charged_micros": cost,
        "jobs_by_status": dict(Counter(job_status.values())),
        "jobs_by_error": dict(Counter(code for _, status, code in jobs if status != "completed")),
        "ledger_transactions": transactions,
        "books": nonzero,
        "wrongly_charged": wrongly_charged[:50],
        "not_charged": not_charged[:50],
    }
    return checks, facts


FAULTS = {"flaky": "failed", "dying": "gone", "hanging": "timeout"}
LATE_AT_LEAST_S = 2 * COOLDOWN_CAP_S + 30


def fault_checks(
    db_path: Path, profiles: list[str], load_started_at: str, load_s: float
) -> tuple[list[Check], dict[str, Any]]:
    """Attempts by device profile and outcome, from the job log, and whether each kind of
    fault still happened late in the load: the router learns to avoid failing devices (a
    cooldown of up to ``COOLDOWN_CAP_S`` after each failure, then only when the others
    are busy), and a soak whose faults died out early tested little. "Late" is the second
    half of the load, or the whole of a load shorter than ``LATE_AT_LEAST_S`` twice."""
    start = datetime.fromisoformat(load_started_at)
    late_s = max(load_s / 2, min(load_s, LATE_AT_LEAST_S))
    half = (start + timedelta(seconds=load_s - late_s)).strftime("%Y-%m-%d %H:%M:%S.%f")
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT d.name, a.outcome, a.started_at >= ?, count(*) FROM job_attempts a "
            "JOIN devices d ON d.id = a.device_id GROUP BY 1, 2, 3",
            (half,),
        ).fetchall()
    finally:
        db.close()
    overall: dict[str, Counter[str]] = {p: Counter() for p in dict.fromkeys(profiles)}
    late: dict[str, Counter[str]] = {p: Counter() for p in dict.fromkeys(profiles)}
    for name, outcome, second_half, count in rows:
        index = int(name[4:]) if name.startswith("sim-") and name[4:].isdigit() else -1
        if 0 <= index < len(profiles):
            overall[profiles[index]][outcome] += count
            if second_half:
                late[profiles[index]][outcome] += count
    missing = []
    for profile, outcome in FAULTS.items():
        # A dying device's attempts end "gone", or "interrupted" when it had streamed tokens.
        seen = late[profile][outcome] + (late[profile]["interrupted"] if profile == "dying" else 0)
        if profile in late and not seen:
            missing.append(profile)
    check = Check(
        "the faults stayed in play (each faulty profile failed attempts late in the load)",
        not missing,
        f"last {late_s:.0f} s: "
        + "; ".join(f"{p} {dict(c)}" for p, c in late.items() if p in FAULTS)
        + (f"; no faults from {missing}" if missing else ""),
    )
    facts = {
        "attempts_by_profile": {p: dict(c) for p, c in overall.items()},
        "late_s": late_s,
        "attempts_by_profile_late": {p: dict(c) for p, c in late.items()},
    }
    return [check], facts


def memory_check(samples: list[dict[str, Any]], load_s: float, limit_mib: float) -> Check:
    stats = rss_stats(samples, load_s)
    growth = stats.get("growth_mib")
    return Check(
        "gateway memory did not grow",
        growth is not None and growth <= limit_mib,
        f"median RSS {stats.get('baseline_mib')} MiB in [{stats.get('baseline_window')}] s, "
        f"{stats.get('final_mib')} MiB in [{stats.get('final_window')}] s: {growth:+} MiB "
        f"(limit {limit_mib}); slope after the first window {stats.get('slope_mib_per_min')} "
        "MiB/min"
        if growth is not None
        else "too few samples",
    )


def rss_stats(samples: list[dict[str, Any]], load_s: float) -> dict[str, Any]:
    """Gateway RSS: median of the second window against the last one during the load; a
    window is a minute, or a quarter of the load if that is shorter. The slope is a least
    squares fit over the load after the first window (warm-up)."""
    window = min(60.0, load_s / 4)
    points = [(s["t"], s["gateway_rss_mib"]) for s in samples if "gateway_rss_mib" in s]
    during = [(t, r) for t, r in points if t <= load_s]

    def median_in(lo: float, hi: float) -> float | None:
        values = [r for t, r in during if lo <= t < hi]
        return round(statistics.median(values), 2) if values else None

    baseline = median_in(window, 2 * window)
    final = median_in(load_s - window, load_s + 1)
    settled = [(t, r) for t, r in during if t >= window]
    slope = None
    if len(settled) >= 3:
        slope = round(statistics.linear_regression(*zip(*settled, strict=True)).slope * 60, 3)
    return {
        "window_s": window,
        "baseline_window": f"{window:.0f}, {2 * window:.0f}",
        "final_window": f"{load_s - window:.0f}, {load_s:.0f}",
        "start_mib": points[0][1] if points else None,
        "peak_mib": max((r for _, r in points), default=None),
        "end_mib": points[-1][1] if points else None,
        "baseline_mib": baseline,
        "final_mib": final,
        "growth_mib": round(final - baseline, 2)
        if final is not None and baseline is not None
        else None,
        "slope_mib_per_min": slope,
    }


# -- the report --------------------------------------------------------------------------
def summarize(outcomes: list[Outcome], load_s: float) -> dict[str, Any]:
    def latency(selected: list[Outcome]) -> dict[str, Any]:
        values = [o.latency_s for o in selected]
        return {
            "n": len(values),
            "p50_ms": round(pct(values, 50) * 1e3, 1),
            "p99_ms": round(pct(values, 99) * 1e3, 1),
            "max_ms": round(max(values, default=float("nan")) * 1e3, 1),
        }

    done = [o for o in outcomes if o.result == "completed"]
    return {
        "requests": len(outcomes),
        "by_result": dict(Counter(o.result for o in outcomes)),
        "by_code": dict(
            Counter(
                f"{o.status if o.result == 'failed' else 'stream'} {o.code}"
                for o in outcomes
                if o.code
            )
        ),
        "completed_per_s": round(len(done) / load_s, 2) if load_s else 0.0,
        "failovers": sum(1 for o in done if (o.attempts or 1) > 1),
        "continued_streams": sum(1 for o in done if o.continued),
        "latency": {
            "completed_plain": latency([o for o in done if not o.stream]),
            "completed_stream": latency([o for o in done if o.stream]),
            "failed": latency([o for o in outcomes if o.result != "completed"]),
        },
        "ttft_ms": {
            "p50": round(pct([o.ttft_s for o in done if o.ttft_s], 50) * 1e3, 1),
            "p99": round(pct([o.ttft_s for o in done if o.ttft_s], 99) * 1e3, 1),
        },
    }


def table(report: dict[str, Any]) -> str:
    s, rss, cpu = report["summary"], report["rss"], report.get("cpu_s", {})
    plan = report["plan"]
    lines = [
        "| figure | value |",
        "|---|---:|",
        f"| load | {plan['minutes']:g} min at {plan['rate']:g} req/s, "
        f"{plan['stream_share']:.0%} streamed, mix {plan['mix']}, {plan['slots']} slots each |",
        f"| requests sent | {s['requests']} (skipped at the in-flight cap: {report['skipped']}; "
        f"sent over 50 ms late: {report['late_sends']}) |",
    ]
    for result, count in sorted(s["by_result"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {result} | {count} ({count / max(1, s['requests']):.1%}) |")
    for code, count in sorted(s["by_code"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| error {code} | {count} |")
    lat = s["latency"]
    lines += [
        f"| completed per second | {s['completed_per_s']} |",
        f"| completed after a failover / continued streams | {s['failovers']} / "
        f"{s['continued_streams']} |",
    ]
    for name, label in (
        ("completed_plain", "latency, completed, non-streamed"),
        ("completed_stream", "latency, completed streams (whole stream)"),
        ("failed", "latency, failed"),
    ):
        v = lat[name]
        lines.append(
            f"| {label} p50 / p99 / max | {v['p50_ms']} / {v['p99_ms']} / {v['max_ms']} ms "
            f"(n={v['n']}) |"
        )
    lines += [
        f"| streams: time to first content p50 / p99 | {s['ttft_ms']['p50']} / "
        f"{s['ttft_ms']['p99']} ms |",
        f"| gateway RSS start / peak / end | {rss['start_mib']} / {rss['peak_mib']} / "
        f"{rss['end_mib']} MiB |",
        f"| gateway RSS median, 2nd window → last window | {rss['baseline_mib']} → "
        f"{rss['final_mib']} MiB ({rss['growth_mib']:+} MiB; windows of {rss['window_s']:.0f} s) |"
        if rss.get("growth_mib") is not None
        else "| gateway RSS windows | too few samples |",
        f"| gateway RSS slope after warm-up | {rss['slope_mib_per_min']} MiB/min |",
    ]
    wall = report["load_s"] + report["drain_s"]
    for name in ("gateway", "simulate", "client", "others"):
        if name in cpu:
            lines.append(
                f"| CPU, load and drain ({wall:.0f} s): {name} | {cpu[name]:.1f} s "
                f"({cpu[name] / wall:.0%} of a core) |"
            )
    if "gateway" in report.get("stopped", {}):
        g = report["stopped"]["gateway"]
        lines.append(f"| gateway stop (SIGTERM) | rc {g['returncode']} in {g['stop_s']} s |")
    lines.append(f"| suspended devices cleared | {len(report.get('clears', []))} |")
    for profile, outcomes in report["faults"]["attempts_by_profile"].items():
        listed = ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
        lines.append(f"| attempts on {profile} devices | {listed or 'none'} |")
    if "books" in report:
        b = report["books"]
        lines.append(
            f"| charges | {b['charge_rows']} rows for {b['charged_jobs']} jobs "
            f"({b['part_charges']} continuation parts), {b['charged_micros']} micro-dollars |"
        )
    return "\n".join(lines)


def print_checks(checks: list[Check]) -> None:
    for check in checks:
        print(f"[{'PASS' if check.ok else 'FAIL'}] {check.name}: {check.detail}")


# -- running it --------------------------------------------------------------------------
async def soak(fleet: Fleet, plan: Plan, live: Live, log: Callable[[str], None]) -> dict[str, Any]:
    procs = {name: psutil.Process(fleet.stack.pid(name)) for name in ("gateway", "simulate")}
    stop = asyncio.Event()
    t0 = time.perf_counter() + 0.05
    started_at = datetime.now(UTC) + timedelta(seconds=0.05)
    admin_client = httpx.AsyncClient(
        base_url=fleet.base, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30
    )
    side = [asyncio.create_task(sample(procs, live, plan.sample_every_s, t0, stop))]
    if plan.clear_every_s > 0:
        side.append(
            asyncio.create_task(keep_faults(admin_client, live, plan.clear_every_s, t0, stop))
        )

    async def progress() -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 30)
            by = Counter(o.result for o in live.outcomes)
            rss = live.samples[-1].get("gateway_rss_mib") if live.samples else None
            log(
                f"  t={time.perf_counter() - t0:5.0f} s: {live.finished} finished "
                f"({', '.join(f'{k} {v}' for k, v in sorted(by.items()))}), "
                f"{live.in_flight} in flight, gateway RSS {rss} MiB"
            )

    side.append(asyncio.create_task(progress()))
    try:
        with cpu_meter({name: p.pid for name, p in procs.items()}) as cpu:
            load_s = await drive(fleet.base, fleet.stack.api_key, plan, live, t0)
            drain_s = time.perf_counter() - t0 - load_s
    finally:
        stop.set()
        await asyncio.gather(*side, return_exceptions=True)
        await admin_client.aclose()
    return {
        "load_s": load_s,
        "drain_s": drain_s,
        "cpu_s": {k: round(v, 2) for k, v in cpu.items()},
        "load_started_at": started_at.isoformat(),
    }


def run_checks(
    data_dir: Path, state: dict[str, Any], limit_mib: float
) -> tuple[list[Check], dict[str, Any]]:
    outcomes = [Outcome(**o) for o in state["outcomes"]]
    checks, client_facts = client_checks(outcomes)
    books, book_facts = book_checks(
        data_dir / "swarmgate.db",
        outcomes,
        state["developer_id"],
        state["credit_micros"],
        state["after"],
    )
    checks += books
    faults, fault_facts = fault_checks(
        data_dir / "swarmgate.db", state["profiles"], state["load_started_at"], state["load_s"]
    )
    checks = faults + checks
    stopped = state.get("stopped", {}).get("gateway", {})
    checks.append(
        Check(
            "the gateway stopped cleanly on SIGTERM",
            # uvicorn shuts down gracefully, then re-raises the signal it caught.
            stopped.get("returncode") in (0, -signal.SIGTERM),
            f"exit status {stopped.get('returncode')} after {stopped.get('stop_s')} s "
            "(-15: graceful, then the signal re-raised; None: killed after the wait)",
        )
    )
    log_file = data_dir / "gateway.log"
    text = log_file.read_text(errors="replace") if log_file.exists() else ""
    bad = [line for line in text.splitlines() if re.search(r" (ERROR|CRITICAL) |^Traceback", line)]
    checks.append(
        Check(
            "the gateway logged no error",
            not bad,
            f"{len(bad)} ERROR/CRITICAL/Traceback lines"
            + (f", first: {bad[0][:300]}" if bad else ""),
        )
    )
    checks.append(memory_check(state["samples"], state["load_s"], limit_mib))
    return checks, {"client": client_facts, "books": book_facts, "faults": fault_facts}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 1-minute smoke run")
    parser.add_argument("--minutes", type=float, help="minutes of load (default 10; quick 1)")
    parser.add_argument("--rate", type=float, default=30.0, help="requests sent per second")
    parser.add_argument("--max-in-flight", type=int, default=128)
    parser.add_argument("--stream-share", type=float, default=0.5)
    parser.add_argument(
        "--client-timeout",
        type=float,
        default=120.0,
        help="seconds before a request counts as hung",
    )
    parser.add_argument("--mix", default=DEFAULT_MIX, help="swarmgate simulate --mix")
    parser.add_argument("--slots", type=int, default=2, help="slots per simulated device")
    parser.add_argument(
        "--sim-ttft-ms", type=float, default=100.0, help="devices' time to first token"
    )
    parser.add_argument(
        "--sim-tokens-per-s", type=float, default=100.0, help="devices' token rate (slow: 25)"
    )
    parser.add_argument(
        "--price-multiplier",
        type=int,
        default=1000,
        help="the soak model's catalog prices times this (1: the shipped prices)",
    )
    parser.add_argument("--sample-every", type=float, default=2.0, help="seconds between samples")
    parser.add_argument(
        "--clear-every",
        type=float,
        default=20.0,
        help="seconds between clearing suspended devices (0: let suspensions stand)",
    )
    parser.add_argument(
        "--rss-growth-limit-mib",
        type=float,
        default=8.0,
        help="most the gateway's median RSS may grow from the second window to the last",
    )
    parser.add_argument(
        "--gateway-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an extra SWARMGATE_* setting for the gateway (repeatable)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the data dir even if all pass")
    parser.add_argument(
        "--recheck", type=Path, metavar="DIR", help="only run the checks on a kept data dir"
    )
    args = parser.parse_args(argv)

    if args.recheck is not None:
        state = orjson.loads((args.recheck / STATE_FILE).read_bytes())
        checks, _facts = run_checks(args.recheck, state, args.rss_growth_limit_mib)
        print_checks(checks)
        return 0 if all(c.ok for c in checks) else 1

    minutes = args.minutes or (1.0 if args.quick else 10.0)
    plan = Plan(
        minutes=minutes,
        rate=args.rate,
        max_in_flight=args.max_in_flight,
        stream_share=args.stream_share,
        client_timeout_s=args.client_timeout,
        sample_every_s=args.sample_every,
        clear_every_s=args.clear_every,
        seed=args.seed,
        mix=args.mix,
        slots=args.slots,
        sim_ttft_ms=args.sim_ttft_ms,
        sim_tokens_per_s=args.sim_tokens_per_s,
        price_multiplier=args.price_multiplier,
    )
    extra_env = dict(item.split("=", 1) for item in args.gateway_env)
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(0, {CLIENT_CORE})
    exit_on_sigterm()

    def log(line: str) -> None:
        print(line, flush=True)

    data_dir = Path(tempfile.mkdtemp(prefix="swarmgate-soak-"))
    started = datetime.now(UTC)
    host = machine()
    host["pinning"] = {"gateway": GATEWAY_CORE, "simulate": CLIENT_CORE, "load": CLIENT_CORE}
    live = Live()
    fleet: Fleet | None = None
    report: dict[str, Any] = {}
    checks: list[Check] = []
    try:
        log(f"data dir {data_dir}; starting the gateway (core {GATEWAY_CORE}) and the devices")
        fleet = start_fleet(data_dir, plan, extra_env)
        log(f"{len(fleet.profiles)} devices connected ({args.mix}); {minutes:g} min of load")
        import uvloop

        timing = uvloop.run(soak(fleet, plan, live, log))
        log("load done; waiting for the gateway to settle")
        after = settle_and_read(fleet)
        stopped = {"simulate": stop_gracefully(fleet.stack.procs["simulate"])}
        stopped["gateway"] = stop_gracefully(fleet.stack.procs["gateway"])
        state = {
            "developer_id": fleet.developer_id,
            "credit_micros": fleet.credit_micros,
            "after": after,
            "stopped": stopped,
            "samples": live.samples,
            "load_s": timing["load_s"],
            "load_started_at": timing["load_started_at"],
            "profiles": fleet.profiles,
            "outcomes": [asdict(o) for o in live.outcomes],
        }
        (data_dir / STATE_FILE).write_bytes(orjson.dumps(state))
        checks, facts = run_checks(data_dir, state, args.rss_growth_limit_mib)
        report = {
            "plan": asdict(plan),
            "load_s": round(timing["load_s"], 2),
            "drain_s": round(timing["drain_s"], 2),
            "skipped": live.skipped,
            "late_sends": live.late,
            "summary": summarize(live.outcomes, timing["load_s"]),
            "rss": rss_stats(live.samples, timing["load_s"]),
            "cpu_s": timing["cpu_s"],
            "stopped": stopped,
            "clears": live.clears,
            "devices": after["devices"],
            "usage": {k: v for k, v in after["usage"].items() if k != "by_key"},
            "books": facts["books"],
            "client": facts["client"],
            "faults": facts["faults"],
        }
    finally:
        if fleet is not None:
            fleet.stack.stop()
        failed = not checks or not all(c.ok for c in checks)
        if args.keep or failed:
            print(f"data dir kept: {data_dir}")
        else:
            shutil.rmtree(data_dir, ignore_errors=True)
    report = {
        "benchmark": "fault_soak",
        "started_at": started.isoformat(),
        "quick": args.quick,
        "command": " ".join(["python", "benchmarks/fault_soak.py", *(argv or sys.argv[1:])]),
        "machine": host,
        "git": git_state(),
        **report,
        "checks": [asdict(c) for c in checks],
        "samples": live.samples,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"fault_soak-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print()
    print(table(report))
    print()
    print_checks(checks)
    print()
    print(f"results: {out.relative_to(ROOT)}")
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
