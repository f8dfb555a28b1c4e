"""``kill -9`` of the gateway under load: no settled charge lost, no hold left open.

A real ``swarmgate serve`` process takes paid requests (plain, streamed, queued jobs)
from simulated devices; it is killed with SIGKILL in the middle of the load and started
again on the same database. Every answer a client received must be charged, the books
must balance, and the queued jobs must finish (charged once) or give their hold back.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from sqlalchemy import func, select

from swarmgate.accounts import service
from swarmgate.billing.ledger import developer_book, holds_book
from swarmgate.node.agent import NodeAgent
from swarmgate.node.backends.sim import SimBackend, SimConfig
from swarmgate.protocol import DeviceFacts
from swarmgate.store.db import create_engine, migrate
from swarmgate.store.tables import (
    balances,
    charge_journal,
    charges,
    holds,
    jobs,
    ledger_entries,
)
from tests.billing.test_request_billing import priced_catalog
from tests.conftest import MODEL, free_port, swarmgate_cmd, wait_http

CREDIT = 50_000_000


@contextlib.contextmanager
def gateway_process(data_dir: Path, port: int, catalog: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = {
        **os.environ,
        "SWARMGATE_DATA_DIR": str(data_dir),
        "SWARMGATE_PORT": str(port),
        "SWARMGATE_CATALOG_PATH": str(catalog),
        "SWARMGATE_HEARTBEAT_INTERVAL_S": "0.5",
        "SWARMGATE_QUEUE_WAIT_S": "5",
    }
    process = subprocess.Popen(  # noqa: S603 - our own CLI
        swarmgate_cmd("serve"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(20)


async def start_devices(
    port: int, tokens: list[str]
) -> list[tuple[asyncio.Event, asyncio.Task[None]]]:
    running = []
    for token in tokens:
        agent = NodeAgent(
            gateway_url=f"ws://127.0.0.1:{port}/v1/nodes/connect",
            token=token,
            backend=SimBackend(SimConfig(length=12, tokens_per_s=400)),
            models=[MODEL],
            slots=8,
            facts=DeviceFacts(os="sim", cpu="sim", ram_mb=1024),
            reconnect_min_s=0.05,
            reconnect_max_s=0.3,
            drain_timeout_s=1.0,
        )
        stop = asyncio.Event()
        running.append((stop, asyncio.create_task(agent.run(stop))))
    return running


async def stop_devices(running: list[tuple[asyncio.Event, asyncio.Task[None]]]) -> None:
    for stop, _ in running:
        stop.set()
    for _, task in running:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 5)


@pytest.mark.timeout(120)
async def test_kill_9_under_load_loses_no_settled_charge(tmp_path: Path) -> None:
    catalog = priced_catalog(tmp_path)
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'swarmgate.db'}")
    await migrate(engine)
    account = await service.create_account(engine, name="load", credit_micros=CREDIT)
    key = (await service.create_api_key(engine, account_id=account["id"])).secret
    provider = await service.create_account(engine, name="p", developer=False, provider=True)
    tokens = [
        (await service.create_device(engine, account_id=provider["id"])).secret for _ in range(2)
    ]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    answered: set[str] = set()
    queued: list[str] = []

    async def load(client: httpx.AsyncClient, worker: int, stop: asyncio.Event) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": f"worker {worker} request {n}"}],
                "max_tokens": 40,
            }
            try:
                if n % 7 == 0:
                    response = await client.post("/v1/jobs", json=body)
                    if response.status_code == 202:
                        queued.append(response.json()["id"])
                elif n % 2:
                    response = await client.post("/v1/chat/completions", json=body)
                    if response.status_code == 200:
                        answered.add(response.json()["id"])
                else:
                    response = await client.post(
                        "/v1/chat/completions", json={**body, "stream": True}
                    )
                    frames = response.text.split("\n\n")
                    if response.status_code == 200 and "data: [DONE]" in frames:
                        answered.add(orjson.loads(frames[0][6:])["id"])
            except httpx.HTTPError:
                await asyncio.sleep(0.05)  # the gateway is gone; keep trying until told to stop

    headers = {"Authorization": f"Bearer {key}"}
    with gateway_process(tmp_path, port, catalog) as first:
        devices = await start_devices(port, tokens)
        stop = asyncio.Event()
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=10) as client:
            workers = [asyncio.create_task(load(client, i, stop)) for i in range(24)]
            await asyncio.sleep(2.0)
            answered_before_kill = len(answered)
            os.kill(first.pid, signal.SIGKILL)
            first.wait(10)
            stop.set()
            await asyncio.gather(*workers)
        await stop_devices(devices)
    assert answered_before_kill > 20, "the load never got going"

    # Right after the crash every answer received is charged: posted to the ledger, or
    # still in the charge journal's files (posted on restart).
    async with engine.connect() as conn:
        posted = set((await conn.scalars(select(charges.c.job_id))).all())
    segments = sorted((tmp_path / "swarmgate.db-charges").glob("*.log"))
    journaled = {
        orjson.loads(line)["job_id"]
        for segment in segments
        for line in segment.read_bytes().splitlines()
    }
    answered_sync = {job for job in answered if not job.startswith("job_")}
    assert answered_sync <= posted | journaled

    with gateway_process(tmp_path, port, catalog):
        devices = await start_devices(port, tokens)
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=10) as client:
            for _ in range(300):  # queued jobs resume after the restart
                async with engine.connect() as conn:
                    unfinished = await conn.scalar(
                        select(func.count())
                        .select_from(jobs)
                        .where(jobs.c.kind == "async", jobs.c.status.in_(("queued", "running")))
                    )
                if unfinished == 0:
                    break
                await asyncio.sleep(0.1)
            assert unfinished == 0
            assert (await client.get("/v1/usage")).status_code == 200
        await stop_devices(devices)

    async with engine.connect() as conn:
        # The restart posted the journal: every answer is in the ledger now.
        assert await conn.scalar(select(func.count()).select_from(charge_journal)) == 0
        assert not any(segment.exists() for segment in segments)
        in_ledger = set((await conn.scalars(select(charges.c.job_id))).all())
        assert answered_sync <= in_ledger
        assert await conn.scalar(select(func.sum(ledger_entries.c.amount_micros))) == 0
        assert await conn.scalar(select(func.sum(balances.c.amount_micros))) == 0
        open_holds = await conn.scalar(
            select(func.count()).select_from(holds).where(holds.c.status == "open")
        )
        spent = int(await conn.scalar(select(func.sum(charges.c.cost_micros))) or 0)
        job_charges = await conn.scalar(
            select(func.count()).select_from(charges).where(charges.c.job_id.in_(queued))
        )
        completed_jobs = await conn.scalar(
            select(func.count())
            .select_from(jobs)
            .where(jobs.c.id.in_(queued), jobs.c.status == "completed")
        )
        book = {
            row.book: int(row.amount_micros)
            for row in await conn.execute(
                select(balances).where(
                    balances.c.book.in_([developer_book(account["id"]), holds_book(account["id"])])
                )
            )
        }
    await engine.dispose()
    assert open_holds == 0
    assert job_charges == completed_jobs  # each finished job charged exactly once
    assert book[developer_book(account["id"])] == CREDIT - spent
    assert book.get(holds_book(account["id"]), 0) == 0
