"""Two ``swarmgate serve`` processes on one PostgreSQL and one Redis, two devices on each,
requests on both; one gateway is killed with SIGKILL in the middle of the load.

What must hold: every request sent to the surviving gateway succeeds (those running on
the dead gateway's devices fail over), the surviving gateway drops the dead one's devices
within seconds, no job is charged twice, every answer that reached a client is charged
exactly once, the dead gateway's credit reservations expire and the developer's wallet in
Redis agrees with the ledger again, and the ledger's invariants hold. The gateways are
linked directly (``cluster/links.py``), so the kill also breaks their link.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import func, select

from swarmgate.accounts import service
from swarmgate.billing.ledger import Ledger, developer_book
from swarmgate.cluster.keys import ClusterKeys
from swarmgate.node.agent import NodeAgent
from swarmgate.node.backends.sim import SimBackend, SimConfig
from swarmgate.protocol import DeviceFacts
from swarmgate.store.db import create_engine, migrate
from swarmgate.store.tables import balances, charges, holds
from tests.billing.test_ledger_properties import check_ledger
from tests.cluster.conftest import REDIS_URL
from tests.conftest import ADMIN_TOKEN, MODEL, free_port, stop_process, swarmgate_cmd, wait_http

CREDIT = 50_000_000


@contextlib.contextmanager
def gateway_process(
    tmp_path: Path, name: str, port: int, database_url: str, prefix: str
) -> Iterator[subprocess.Popen[bytes]]:
    env = {
        **os.environ,
        "SWARMGATE_DATABASE_URL": database_url,
        "SWARMGATE_REDIS_URL": REDIS_URL,
        "SWARMGATE_REDIS_PREFIX": prefix,
        "SWARMGATE_GATEWAY_ID": name,
        "SWARMGATE_PORT": str(port),
        "SWARMGATE_DATA_DIR": str(tmp_path / name),
        "SWARMGATE_ADMIN_TOKEN": ADMIN_TOKEN,
        "SWARMGATE_CLUSTER_GATEWAY_TTL_S": "1.5",
        "SWARMGATE_CLUSTER_LIVENESS_INTERVAL_S": "0.3",
        "SWARMGATE_CLUSTER_SYNC_INTERVAL_S": "1",
        "SWARMGATE_HOLD_TTL_S": "4",
        "SWARMGATE_CLUSTER_RESERVATION_LEASE_S": "2",
        "SWARMGATE_CLUSTER_LINK_PORT": str(free_port()),
        "SWARMGATE_CLUSTER_LINK_BIND": "127.0.0.1",
        "SWARMGATE_CLUSTER_LINK_HOST": "127.0.0.1",
        "SWARMGATE_CLUSTER_SECRET": "the two processes' shared link secret",
        "SWARMGATE_HOLD_SWEEP_INTERVAL_S": "1",
        # After the kill, 8 clients share the survivor's two single-slot devices; on a
        # busy machine their queue can pass the default 2 s wait (a clean 503
        # DEVICES_BUSY). This test is about the kill, not about admission under load.
        "SWARMGATE_QUEUE_WAIT_S": "15",
        "SWARMGATE_FIRST_TOKEN_TIMEOUT_S": "5",
        "SWARMGATE_HEARTBEAT_INTERVAL_S": "0.5",
        "SWARMGATE_CANARY_INTERVAL_S": "0",
        "SWARMGATE_LOG_LEVEL": "WARNING",
    }
    log = (tmp_path / f"{name}.log").open("wb")
    process = subprocess.Popen(  # noqa: S603 - our own CLI
        swarmgate_cmd("serve"), env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        yield process
    finally:
        stop_process(process)
        log.close()


def sim_agent(url: str, token: str) -> NodeAgent:
    return NodeAgent(
        gateway_url=url,
        token=token,
        backend=SimBackend(SimConfig(tokens_per_s=80, length=24)),
        models=[MODEL],
        facts=DeviceFacts(os="sim", cpu="sim", ram_mb=1024),
        reconnect_min_s=0.1,
        reconnect_max_s=0.5,
        drain_timeout_s=1.0,
    )


async def _devices_seen(base_url: str) -> int:
    async with httpx.AsyncClient(timeout=2) as client:
        response = await client.get(f"{base_url}/readyz")
        return int(response.json().get("devices", 0)) if response.status_code == 200 else -1


@pytest.mark.timeout(180)
async def test_kill_one_gateway_during_load(tmp_path: Path, pg_url: str, redis_prefix: str) -> None:
    engine = create_engine(pg_url)
    await migrate(engine)
    developer = await service.create_account(engine, name="dev", credit_micros=CREDIT)
    key = (await service.create_api_key(engine, account_id=developer["id"])).secret
    provider = await service.create_account(engine, name="prov", developer=False, provider=True)
    tokens = [
        (await service.create_device(engine, account_id=provider["id"])).secret for _ in range(4)
    ]
    ports = {"gw-one": free_port(), "gw-two": free_port()}
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    stops: list[tuple[asyncio.Event, asyncio.Task[None]]] = []
    agents: list[NodeAgent] = []
    with (
        gateway_process(tmp_path, "gw-one", ports["gw-one"], pg_url, redis_prefix),
        gateway_process(tmp_path, "gw-two", ports["gw-two"], pg_url, redis_prefix) as two,
    ):
        try:
            for url in urls.values():
                await asyncio.to_thread(wait_http, f"{url}/healthz", 60)
            for index, token in enumerate(tokens):
                name = "gw-one" if index < 2 else "gw-two"
                ws = f"ws://127.0.0.1:{ports[name]}/v1/nodes/connect"
                stop = asyncio.Event()
                agents.append(sim_agent(ws, token))
                stops.append((stop, asyncio.create_task(agents[-1].run(stop))))
            deadline = time.monotonic() + 30
            while min([await _devices_seen(u) for u in urls.values()]) < 4:
                assert time.monotonic() < deadline, "the gateways never saw all four devices"
                await asyncio.sleep(0.1)

            results: list[tuple[str, float, Any]] = []
            started = time.monotonic()
            killed_at: list[float] = []

            async def worker(index: int, client: httpx.AsyncClient) -> None:
                turn = index
                while time.monotonic() - started < 6.0:
                    name = "gw-one" if turn % 2 else "gw-two"
                    turn += 1
                    if name == "gw-two" and killed_at:
                        continue
                    at = time.monotonic()
                    try:
                        response = await client.post(
                            f"{urls[name]}/v1/chat/completions",
                            json={
                                "model": MODEL,
                                "messages": [{"role": "user", "content": f"hello {turn}"}],
                                "max_tokens": 16,
                            },
                        )
                        results.append((name, at, response))
                    except httpx.HTTPError as exc:
                        results.append((name, at, exc))

            async def killer() -> None:
                await asyncio.sleep(2.0)
                two.send_signal(signal.SIGKILL)
                killed_at.append(time.monotonic())

            headers = {"Authorization": f"Bearer {key}"}
            async with httpx.AsyncClient(headers=headers, timeout=30) as client:
                await asyncio.gather(killer(), *(worker(i, client) for i in range(8)))
            two.wait(5)

            # The survivor dropped the dead gateway's devices within seconds.
            deadline = killed_at[0] + 10
            while await _devices_seen(urls["gw-one"]) != 2:
                assert time.monotonic() < deadline, "the dead gateway's devices are still listed"
                await asyncio.sleep(0.1)

            on_one = [(at, r) for name, at, r in results if name == "gw-one"]
            failures = [r for _at, r in on_one if not isinstance(r, httpx.Response)]
            failures += [
                r.text
                for _at, r in on_one
                if isinstance(r, httpx.Response) and r.status_code != 200
            ]
            assert failures == [], failures[:3]
            assert len(on_one) >= 20
            answers = [r.json() for _at, r in on_one if isinstance(r, httpx.Response)]
            own = {agent.stats.device_id for agent in agents[:2]}
            remote = [a for a in answers if a["swarmgate"]["device_id"] not in own]
            assert remote, "no request on gw-one was served by a device of gw-two"
            failed_over = [a for a in answers if a["swarmgate"]["attempts"] > 1]
            assert failed_over, "no request on gw-one had to fail over"

            # The reservations of requests that died with gw-two expire (their lease is
            # no longer renewed), and the wallet, marked stale, is read again from the
            # ledger: it then agrees with the ledger to the micro-dollar.
            book = developer_book(developer["id"])
            wallet_key = ClusterKeys(redis_prefix).wallet(developer["id"], False)[0]
            redis = Redis.from_url(REDIS_URL)
            try:
                deadline = time.monotonic() + 20
                while True:
                    async with httpx.AsyncClient(headers=headers) as client:
                        usage = await client.get(f"{urls['gw-one']}/v1/usage")
                    assert usage.status_code == 200, usage.text
                    bal, held, stale = await redis.hmget(wallet_key, "bal", "held", "stale")
                    ledger = (await Ledger(engine).book_balances([book]))[book]
                    if stale is None and held == b"0" and int(bal) == ledger:
                        break
                    assert time.monotonic() < deadline, (bal, held, stale, ledger)
                    await asyncio.sleep(0.5)
            finally:
                await redis.aclose()
            async with engine.connect() as conn:
                still_open = await conn.scalar(
                    select(func.count()).select_from(holds).where(holds.c.status == "open")
                )
            assert still_open == 0
        finally:
            for stop, _task in stops:
                stop.set()
            for _stop, task in stops:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(task, 5)

    # Nothing charged twice; every answer a client got is charged exactly once.
    async with engine.connect() as conn:
        rows = (await conn.execute(select(charges.c.job_id, charges.c.cost_micros))).all()
        left = await conn.scalar(
            select(balances.c.amount_micros).where(
                balances.c.book == developer_book(developer["id"])
            )
        )
    job_ids = [r.job_id for r in rows]
    assert len(job_ids) == len(set(job_ids))
    delivered = {
        r.json()["id"]
        for _name, _at, r in results
        if isinstance(r, httpx.Response) and r.status_code == 200
    }
    assert delivered <= set(job_ids)
    assert CREDIT - sum(int(r.cost_micros) for r in rows) == left
    await check_ledger(engine)
    await engine.dispose()
