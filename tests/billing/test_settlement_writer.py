"""The settlement writer on SQLite: a charge is appended to the journal file before its
future resolves (before ``submit`` returns), a thread posts it to the ledger, a charge
the ledger refuses is kept for an operator, and a restart posts what a crashed process
left — once."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from swarmgate.accounts import service
from swarmgate.accounts.keys import utcnow
from swarmgate.billing.ledger import developer_book
from swarmgate.billing.pricing import split_earnings
from swarmgate.billing.settlement import ChargeRefused, PendingCharge, SettlementWriter
from swarmgate.store.db import create_engine, migrate
from swarmgate.store.tables import charges
from tests.billing.test_ledger_properties import check_ledger


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}")
    await migrate(engine)
    yield engine
    await engine.dispose()


def charge(job_id: str, account_id: str, provider_id: str, amount: int = 100) -> PendingCharge:
    provider, platform = split_earnings(amount, 8_500)
    return PendingCharge(
        job_id=job_id,
        account_id=account_id,
        key_id=None,
        sandbox=False,
        model="m",
        device_id="dev_1",
        provider_account_id=provider_id,
        prompt_tokens=10,
        completion_tokens=20,
        charged_micros=amount,
        provider_micros=provider,
        platform_micros=platform,
        created_at=utcnow(),
    )


async def setup(
    engine: AsyncEngine, post_interval_s: float = 3_600
) -> tuple[str, str, SettlementWriter]:
    """A developer with $1 of credit, a provider, and a started writer (posting from the
    journal only every ``post_interval_s``, or when asked)."""
    dev = await service.create_account(engine, name="dev", credit_micros=1_000_000)
    prov = await service.create_account(engine, name="prov", developer=False, provider=True)
    writer = SettlementWriter(engine, post_interval_s=post_interval_s)
    await writer.recover()
    writer.start()
    return dev["id"], prov["id"], writer


async def counts(engine: AsyncEngine) -> tuple[int, int]:
    """(charges kept as refused, charges posted)."""
    async with engine.connect() as conn:
        refused = await conn.scalar(text("SELECT count(*) FROM charge_journal"))
        posted = await conn.scalar(select(func.count()).select_from(charges))
    return int(refused or 0), int(posted or 0)


def journal_files(engine: AsyncEngine) -> list[Path]:
    return sorted(Path(f"{engine.url.database}-charges").glob("*"))


def journaled(engine: AsyncEngine) -> list[str]:
    """The job ids in the journal's files, in order."""
    return [
        orjson.loads(line)["job_id"]
        for path in journal_files(engine)
        for line in path.read_bytes().splitlines()
    ]


async def test_a_charge_is_journaled_as_it_is_submitted_then_posted(engine: AsyncEngine) -> None:
    # Posting only when asked, to see where each charge is.
    dev_id, prov_id, writer = await setup(engine)
    try:
        # Settled by the time submit returns: its waiter need not give up the event loop.
        settled = [writer.submit(charge(f"job_{n}", dev_id, prov_id)) for n in range(5)]
        assert [f.done() and f.result() is None for f in settled] == [True] * 5
        assert writer.batches == 5
        assert journaled(engine) == [f"job_{n}" for n in range(5)]
        assert await counts(engine) == (0, 0)
        # Not posted yet, but the developer's balance read through the writer counts them.
        assert await writer.developer_balance(dev_id, False) == 1_000_000 - 500

        await writer.submit(charge("job_5", dev_id, prov_id))
        await writer.posted()
        assert await counts(engine) == (0, 6)
        assert await writer.developer_balance(dev_id, False) == 1_000_000 - 600
    finally:
        await writer.stop()
    assert journal_files(engine) == []  # every charge posted: the journal is gone
    balances = await check_ledger(engine)
    assert balances[developer_book(dev_id)] == 1_000_000 - 600


async def test_a_charge_the_ledger_refuses_is_kept_for_an_operator(engine: AsyncEngine) -> None:
    dev_id, prov_id, writer = await setup(engine)
    try:
        await writer.submit(charge("job_once", dev_id, prov_id))
        await writer.posted()
        # The same job charged again, among others: settled (its answer went out), but the
        # ledger refuses to post that one, and only that one.
        group = [charge(f"job_g{n}", dev_id, prov_id) for n in range(20)]
        group.insert(5, charge("job_once", dev_id, prov_id))
        assert await asyncio.gather(*(writer.submit(c) for c in group)) == [None] * 21
        await writer.posted()
    finally:
        await writer.stop()
    assert await counts(engine) == (1, 21)
    async with engine.connect() as conn:
        body, error = (
            await conn.execute(
                text("SELECT body, error FROM charge_journal WHERE failed_at IS NOT NULL")
            )
        ).one()
    assert orjson.loads(body)["job_id"] == "job_once"
    assert "UNIQUE" in error
    balances = await check_ledger(engine)
    assert balances[developer_book(dev_id)] == 1_000_000 - 100 * 21


async def test_the_writer_thread_posts_the_journal_by_itself(engine: AsyncEngine) -> None:
    dev_id, prov_id, writer = await setup(engine, post_interval_s=0.05)
    try:
        # Charges arriving one at a time, each waited for, while the thread posts between
        # them (it sleeps between postings, and is woken by the first charge after).
        for n in range(40):
            await writer.submit(charge(f"job_{n}", dev_id, prov_id))
            if n % 10 == 0:
                await asyncio.sleep(0.08)
        async with asyncio.timeout(10):
            while await counts(engine) != (0, 40):
                await asyncio.sleep(0.02)
        assert await writer.developer_balance(dev_id, False) == 1_000_000 - 100 * 40
    finally:
        await writer.stop()
    late = writer.submit(charge("job_late", dev_id, prov_id))
    with pytest.raises(ChargeRefused):
        await late
    balances = await check_ledger(engine)
    assert balances[developer_book(dev_id)] == 1_000_000 - 100 * 40


async def test_stop_writes_and_posts_everything_submitted(engine: AsyncEngine) -> None:
    dev_id, prov_id, writer = await setup(engine)
    done = [writer.submit(charge(f"job_{n}", dev_id, prov_id)) for n in range(3)]
    await writer.stop()  # before the thread took them
    assert [f.result() for f in done] == [None, None, None]
    assert await counts(engine) == (0, 3)
    assert journal_files(engine) == []


async def test_a_full_segment_is_deleted_once_posted(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    dev_id, prov_id, writer = await setup(engine)
    record = len(charge("job_0", dev_id, prov_id).journal_record())
    monkeypatch.setattr("swarmgate.billing.settlement.SEGMENT_BYTES", 4 * record)
    try:
        for n in range(10):  # a segment is full after four charges
            await writer.submit(charge(f"job_{n}", dev_id, prov_id))
        assert len(journal_files(engine)) == 3
        assert journaled(engine) == [f"job_{n}" for n in range(10)]
        await writer.posted()
        assert len(journal_files(engine)) == 1  # the one still written to
        assert await counts(engine) == (0, 10)
    finally:
        await writer.stop()
    assert journal_files(engine) == []


async def test_a_restart_posts_what_a_crash_left_once(engine: AsyncEngine) -> None:
    dev_id, prov_id, writer = await setup(engine)
    try:
        await writer.submit(charge("job_posted", dev_id, prov_id))
        await writer.posted()
    finally:
        await writer.stop()
    # What a crash leaves: a segment whose first charge was posted (the crash came after
    # that commit, before the file was deleted), two that were not, and a record cut in
    # the middle of its write (its answer was never sent).
    directory = Path(f"{engine.url.database}-charges")
    left = [charge(job, dev_id, prov_id) for job in ("job_posted", "job_a", "job_b")]
    torn = charge("job_torn", dev_id, prov_id).journal_record()[:40]
    segment = directory / "00000000000000000001-1.log"
    segment.write_bytes(b"".join(c.journal_record() for c in left) + torn)

    writer = SettlementWriter(engine)
    try:
        assert await writer.recover() == 2
        assert await writer.recover() == 0
    finally:
        await writer.stop()
    assert not segment.exists()
    async with engine.connect() as conn:
        posted = set((await conn.scalars(select(charges.c.job_id))).all())
    assert posted == {"job_posted", "job_a", "job_b"}
    balances = await check_ledger(engine)
    assert balances[developer_book(dev_id)] == 1_000_000 - 300


async def test_recovery_leaves_a_live_process_s_journal_alone(engine: AsyncEngine) -> None:
    dev_id, prov_id, writer = await setup(engine)
    other = SettlementWriter(engine)
    try:
        await writer.submit(charge("job_live", dev_id, prov_id))
        # A second process starting on the same database while this one runs: the segment
        # is locked by its writer, so recovery must not post it behind its back.
        assert await other.recover() == 0
        assert journaled(engine) == ["job_live"]
    finally:
        await other.stop()
        await writer.stop()
    assert await counts(engine) == (0, 1)
    assert journal_files(engine) == []


async def test_a_failed_write_settles_nothing(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    dev_id, prov_id, writer = await setup(engine)
    try:
        await writer.submit(charge("job_before", dev_id, prov_id))
        real_write = os.write

        def full_disk(fd: int, data: bytes) -> int:
            # Half the group goes in, then the disk is full.
            if len(data) > 100:
                return real_write(fd, data[: len(data) // 2])
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "write", full_disk)
        failed = [writer.submit(charge(f"job_x{n}", dev_id, prov_id)) for n in range(3)]
        outcomes = await asyncio.gather(*failed, return_exceptions=True)
        assert all(isinstance(o, ChargeRefused) for o in outcomes)
        monkeypatch.undo()
        # Nothing of the failed group is left in the journal to be charged later.
        assert journaled(engine) == ["job_before"]
        await writer.submit(charge("job_after", dev_id, prov_id))
        assert journaled(engine) == ["job_before", "job_after"]
    finally:
        await writer.stop()
    async with engine.connect() as conn:
        posted = set((await conn.scalars(select(charges.c.job_id))).all())
    assert posted == {"job_before", "job_after"}
    await check_ledger(engine)
