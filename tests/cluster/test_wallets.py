"""Developers' credit in Redis, shared by every gateway (``cluster/wallets.py``), against
the real local Redis and PostgreSQL: two ``Billing`` objects on one database and one
Redis prefix stand for two gateways."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from swarmgate.accounts import service
from swarmgate.accounts.keys import Principal
from swarmgate.billing.ledger import developer_book, holds_book
from swarmgate.billing.service import Billing, RequestHold
from swarmgate.catalog import Pricing
from swarmgate.cluster.keys import ClusterKeys
from swarmgate.cluster.mesh import command_client
from swarmgate.cluster.wallets import RedisWallets, announced_credit
from swarmgate.errors import BillingUnavailable, InsufficientCredits
from swarmgate.store.db import create_engine, migrate
from tests.billing.test_ledger_properties import check_ledger
from tests.cluster.conftest import REDIS_URL, cluster_settings
from tests.conftest import run_cli

# 1 micro-dollar per prompt token, 2 per completion token.
PRICING = Pricing(input_per_1m_micros=1_000_000, output_per_1m_micros=2_000_000)
TTL_S = 30.0


def wallets_on(redis: Redis, prefix: str, ttl_s: float = TTL_S) -> RedisWallets:
    return RedisWallets(redis, ClusterKeys(prefix), entry_ttl_s=ttl_s)


async def fixed(amount: int) -> int:
    return amount


@dataclass
class Network:
    engine: AsyncEngine
    a: Billing
    b: Billing
    redis: Redis
    prefix: str


@pytest.fixture
async def network(pg_url: str, redis_client: Redis, redis_prefix: str) -> AsyncIterator[Network]:
    """Two gateways' billing on one PostgreSQL database and one Redis prefix."""
    engine = create_engine(pg_url)
    await migrate(engine)
    a = Billing(engine, wallets=wallets_on(redis_client, redis_prefix))
    b = Billing(engine, wallets=wallets_on(redis_client, redis_prefix))
    await a.start()
    await b.start()
    try:
        yield Network(engine, a, b, redis_client, redis_prefix)
    finally:
        await a.stop()
        await b.stop()
        await engine.dispose()


async def developer(engine: AsyncEngine, credit: int) -> Principal:
    account = await service.create_account(
        engine, name="dev", credit_micros=credit, sandbox_credit_micros=0
    )
    return Principal(account["id"], None, "live")


async def hold(billing: Billing, who: Principal, amount: int, job: str, **kw: Any) -> RequestHold:
    return await billing.hold(
        who, model="m", pricing=PRICING, amount_micros=amount, job_id=job, **kw
    )


async def developer_balance(engine: AsyncEngine, account_id: str) -> int:
    billing = Billing(engine)
    return (await billing.ledger.book_balances([developer_book(account_id)]))[
        developer_book(account_id)
    ]


# -- the scripts -------------------------------------------------------------------------
async def test_reserve_loads_takes_refuses_and_resolves(
    redis_client: Redis, redis_prefix: str
) -> None:
    wallets = wallets_on(redis_client, redis_prefix)
    reads = 0

    async def ledger() -> int:
        nonlocal reads
        reads += 1
        return 1_000

    first = await wallets.reserve("acct_1", False, "job_1", 600, ledger)
    assert (first.ok, first.available, reads) == (True, 400, 1)  # loaded once, then taken
    short = await wallets.reserve("acct_1", False, "job_2", 600, ledger)
    # Short: re-read once (money may have come from outside), but an open entry means
    # the read cannot be stored; the wallet says what it has.
    assert (short.ok, short.available, reads) == (False, 400, 2)
    assert await wallets.resolve("acct_1", False, "job_1", -250) == 750  # charged 250
    assert await wallets.read("acct_1", False, ledger) == (750, 0)
    # Resolving twice (a retry) does not release twice; the amount moved is the caller's.
    assert await wallets.resolve("acct_1", False, "job_1", 0) == 750
    # Another account and the sandbox book are wallets of their own.
    assert (await wallets.reserve("acct_1", True, "job_3", 600, ledger)).ok
    assert (await wallets.reserve("acct_2", False, "job_4", 600, ledger)).ok


async def test_a_load_is_stored_only_when_nothing_moved(
    redis_client: Redis, redis_prefix: str
) -> None:
    wallets = wallets_on(redis_client, redis_prefix)
    assert (await wallets.reserve("acct_1", False, "job_1", 100, lambda: fixed(1_000))).ok
    # An entry is open: the ledger may not show its charge yet, so a load is not stored.
    assert not await wallets.load("acct_1", False, lambda: fixed(5_000))
    await wallets.resolve("acct_1", False, "job_1", -100)
    assert await wallets.read("acct_1", False, lambda: fixed(0)) == (900, 0)

    async def racing_read() -> int:
        # A change committed and applied while the ledger was being read.
        await wallets.mark("acct_1", False, "mark_1")
        await wallets.resolve("acct_1", False, "mark_1", 50)
        return 900  # the read missed it

    assert not await wallets.load("acct_1", False, racing_read)
    assert await wallets.read("acct_1", False, lambda: fixed(0)) == (950, 0)
    # Quiet: the ledger's figure is taken (money from outside, say).
    assert await wallets.load("acct_1", False, lambda: fixed(2_000))
    assert await wallets.read("acct_1", False, lambda: fixed(0)) == (2_000, 0)


async def test_entries_of_a_dead_gateway_expire(redis_client: Redis, redis_prefix: str) -> None:
    wallets = wallets_on(redis_client, redis_prefix, ttl_s=0.2)
    assert (await wallets.reserve("acct_1", False, "job_1", 700, lambda: fixed(1_000))).ok
    assert not (await wallets.reserve("acct_1", False, "job_2", 700, lambda: fixed(1_000))).ok
    await asyncio.sleep(0.3)  # the gateway that took job_1 never came back
    assert (await wallets.reserve("acct_1", False, "job_2", 700, lambda: fixed(1_000))).ok


async def test_keys_share_one_hash_tag(redis_prefix: str) -> None:
    keys = ClusterKeys(redis_prefix).wallet("acct_x", True)
    assert len(keys) == 4
    assert {key[key.index("{") : key.index("}") + 1] for key in keys} == {"{acct_x:sandbox}"}


# -- two gateways ------------------------------------------------------------------------
async def test_racing_requests_on_two_gateways_never_overdraw(network: Network) -> None:
    who = await developer(network.engine, credit=37_000)

    async def one(n: int) -> RequestHold | None:
        billing = network.a if n % 2 else network.b
        try:
            return await hold(billing, who, 1_000, f"job_{n}")
        except InsufficientCredits:
            return None

    holds = await asyncio.gather(*(one(n) for n in range(100)))
    won = [h for h in holds if h is not None]
    assert len(won) == 37  # exactly what the credit covers, across both gateways
    # Settle them on the gateway that took them, each for less than it held.
    for n, taken in enumerate(holds):
        if taken is None:
            continue
        billing = network.a if n % 2 else network.b
        await billing.settle(
            taken,
            prompt_tokens=100,
            completion_tokens=100,
            device_id=None,
            provider_account_id=None,
        )
    await network.a.drain_voids()
    await network.b.drain_voids()
    charged = 37 * 300
    assert await developer_balance(network.engine, who.account_id) == 37_000 - charged
    # Both gateways see the same wallet, and it agrees with the ledger.
    for billing in (network.a, network.b):
        balance = await billing.balance(who.account_id)
        assert (balance.available_micros, balance.held_micros) == (37_000 - charged, 0)
    await check_ledger(network.engine)


async def test_voids_and_failed_requests_give_the_credit_back(network: Network) -> None:
    who = await developer(network.engine, credit=1_000)
    first = await hold(network.a, who, 1_000, "job_1")
    with pytest.raises(InsufficientCredits):
        await hold(network.b, who, 1, "job_2")
    network.a.void(first)
    await network.a.drain_voids()
    again = await hold(network.b, who, 1_000, "job_3")
    network.b.void(again)
    await network.b.drain_voids()
    assert (await network.a.balance(who.account_id)).available_micros == 1_000


async def test_top_ups_reach_a_busy_wallet(network: Network) -> None:
    """A credit made while requests run (so the wallet cannot simply be re-read) is applied
    to it — through a gateway, or from the admin CLI's path straight to the ledger."""
    who = await developer(network.engine, credit=1_000)
    running = await hold(network.a, who, 800, "job_1")
    await network.b.top_up(who.account_id, 500, source="admin")
    await announced_credit(
        wallets_on(network.redis, network.prefix),
        network.a.ledger,
        who.account_id,
        700,
        "admin",
    )
    taken = await hold(network.b, who, 1_400, "job_2")  # 200 + 500 + 700
    with pytest.raises(InsufficientCredits):
        await hold(network.a, who, 1, "job_3")
    for billing, h in ((network.a, running), (network.b, taken)):
        billing.void(h)
        await billing.drain_voids()
    # A replayed payment event credits once, in the ledger and in the wallet.
    for _ in range(2):
        await network.a.top_up(who.account_id, 1_000, source="stripe", external_id="evt_1")
    assert (await network.b.balance(who.account_id)).available_micros == 3_200
    assert await developer_balance(network.engine, who.account_id) == 3_200


async def test_a_lost_wallet_is_loaded_again_from_the_ledger(network: Network) -> None:
    who = await developer(network.engine, credit=5_000)
    first = await hold(network.a, who, 1_000, "job_1")
    await network.a.settle(
        first, prompt_tokens=10, completion_tokens=0, device_id=None, provider_account_id=None
    )
    await network.a.drain_voids()
    for key in ClusterKeys(network.prefix).wallet(who.account_id, False):
        await network.redis.delete(key)  # Redis restarted, or evicted it
    assert (await network.b.balance(who.account_id)).available_micros == 4_990
    with pytest.raises(InsufficientCredits):
        await hold(network.b, who, 4_991, "job_2")


async def test_queued_jobs_hold_in_the_ledger_and_the_wallet_follows(network: Network) -> None:
    who = await developer(network.engine, credit=2_000)
    queued = await hold(network.a, who, 1_500, "job_q", in_ledger=True)
    assert queued.ledger_hold_id is not None
    # The credit sits in the ledger's holds book; the wallet counts it as gone.
    held = await network.b.ledger.book_balances([holds_book(who.account_id)])
    assert held[holds_book(who.account_id)] == 1_500
    balance = await network.b.balance(who.account_id)
    assert (balance.available_micros, balance.held_micros) == (500, 1_500)
    with pytest.raises(InsufficientCredits):
        await hold(network.b, who, 501, "job_r")
    # Run on another gateway after a restart: settled there, the rest comes back.
    reopened = await network.b.reopen(
        queued.ledger_hold_id, key_id=None, model="m", pricing=PRICING, job_id="job_q"
    )
    assert reopened is not None
    await network.b.settle_with(
        reopened,
        _nothing,
        prompt_tokens=100,
        completion_tokens=0,
        device_id=None,
        provider_account_id=None,
    )
    assert (await network.a.balance(who.account_id)).available_micros == 1_900
    another = await hold(network.a, who, 400, "job_v", in_ledger=True)
    await network.a.void_in_ledger(another)
    assert (await network.b.balance(who.account_id)).available_micros == 1_900
    assert await developer_balance(network.engine, who.account_id) == 1_900
    await check_ledger(network.engine)


async def test_expired_ledger_holds_come_back_to_the_wallet(network: Network) -> None:
    who = await developer(network.engine, credit=1_000)
    short_lived = Billing(
        network.engine, hold_ttl_s=0.05, wallets=wallets_on(network.redis, network.prefix)
    )
    await hold(short_lived, who, 1_000, "job_q", in_ledger=True)
    assert (await network.a.balance(who.account_id)).available_micros == 0
    await asyncio.sleep(0.1)
    assert await network.b.sweep() == 1
    assert (await network.a.balance(who.account_id)).available_micros == 1_000


async def test_redis_down_is_a_503_and_reserves_nothing(network: Network) -> None:
    who = await developer(network.engine, credit=1_000)
    dead = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    try:
        billing = Billing(network.engine, wallets=wallets_on(dead, network.prefix))
        with pytest.raises(BillingUnavailable):
            await hold(billing, who, 10, "job_1")
        assert billing.holds_open == 0
    finally:
        await dead.aclose()
    assert (await network.a.balance(who.account_id)).available_micros == 1_000


async def _nothing(_conn: Any) -> None:
    return None


async def test_a_burst_waits_for_redis_connections_instead_of_failing(
    network: Network, tmp_path: Path, pg_url: str
) -> None:
    """More requests at once than the gateway has Redis connections: they queue for one
    (before, redis-py's pool refused the 101st command with a 503 for the request)."""
    who = await developer(network.engine, credit=1_000_000)
    settings = cluster_settings(tmp_path, pg_url, network.prefix, "gw-x", redis_max_connections=4)
    client = command_client(settings)
    try:
        billing = Billing(network.engine, wallets=wallets_on(client, network.prefix))
        holds = await asyncio.gather(*(hold(billing, who, 10, f"job_{n}") for n in range(300)))
        for taken in holds:
            billing.void(taken)
        await billing.drain_voids()
        assert client.connection_pool.max_connections == 4
    finally:
        await client.aclose()
    assert (await network.a.balance(who.account_id)).available_micros == 1_000_000


async def test_the_admin_cli_tops_up_a_busy_wallet(
    network: Network, tmp_path: Path, pg_url: str
) -> None:
    who = await developer(network.engine, credit=1_000)
    running = await hold(network.a, who, 1_000, "job_1")  # the wallet cannot be re-read now
    env = {
        "SWARMGATE_DATA_DIR": str(tmp_path / "cli"),
        "SWARMGATE_DATABASE_URL": pg_url,
        "SWARMGATE_REDIS_URL": REDIS_URL,
        "SWARMGATE_REDIS_PREFIX": network.prefix,
    }
    done = await asyncio.to_thread(
        run_cli, "admin", "--json", "accounts", "top-up", who.account_id, "--usd", "0.002", env=env
    )
    assert done.returncode == 0, done.stderr
    taken = await hold(network.b, who, 2_000, "job_2")
    for billing, h in ((network.a, running), (network.b, taken)):
        billing.void(h)
        await billing.drain_voids()
    assert (await network.b.balance(who.account_id)).available_micros == 3_000


async def test_running_requests_keep_their_reservations_a_dead_gateways_expire(
    network: Network,
) -> None:
    who = await developer(network.engine, credit=1_000)
    lease = wallets_on(network.redis, network.prefix, ttl_s=1.0)
    alive = Billing(network.engine, wallets=lease)
    await alive.start()
    try:
        running = await hold(alive, who, 600, "job_long")
        await asyncio.sleep(1.6)  # past the lease: renewed while the request runs
        with pytest.raises(InsufficientCredits):
            await hold(network.a, who, 600, "job_other")
        dying = Billing(network.engine, wallets=lease)  # never started: it renews nothing
        await hold(dying, who, 300, "job_orphan")
        await asyncio.sleep(1.3)  # its gateway died; the lease runs out
        taken = await hold(network.a, who, 400, "job_next")  # 1,000 - 600 running
        alive.void(running)
        network.a.void(taken)
        await alive.drain_voids()
        await network.a.drain_voids()
    finally:
        await alive.stop()
    assert (await network.b.balance(who.account_id)).available_micros == 1_000


async def test_a_wallet_is_loaded_again_after_an_entry_expired(
    redis_client: Redis, redis_prefix: str
) -> None:
    """An entry that expires may be a change the ledger committed but the wallet never
    saw (its gateway died in between): the wallet is re-read at its next quiet moment."""
    wallets = wallets_on(redis_client, redis_prefix, ttl_s=0.2)
    ledger = 1_000
    assert (await wallets.reserve("acct_1", False, "job_1", 500, lambda: fixed(ledger))).ok
    ledger -= 400  # the charge reached the ledger; the gateway died before applying it
    await asyncio.sleep(0.3)
    again = await wallets.reserve("acct_1", False, "job_2", 100, lambda: fixed(ledger))
    assert (again.ok, again.available) == (True, 500)  # 600 in the ledger, less 100
