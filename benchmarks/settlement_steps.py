"""What each step of settling a charge costs, in-process, on SQLite (WAL, NORMAL).

    .venv/bin/python benchmarks/settlement_steps.py [--n 2000]

Prints CPU microseconds per charge for: posting one charge in its own transaction, posting
64 and 512 per transaction (the writer thread posts up to 512), appending one charge to
the journal file (what a request waits for, on the event loop), appending 16 with one
write, a bare round trip to a worker thread (asyncio and uvloop), which a request
would pay if it waited for a write made in another thread, and the whole of what billing
does on the event loop for one request: ``Billing.hold_now`` then ``Billing.settle_now``,
the charge appended to the journal (the event loop's thread CPU only; posting is the
writer thread's). Two rows measure alternatives not taken: appending into a memory-mapped
segment instead of an ``os.write`` per charge, and posting without the two secondary
indexes of ``charges``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import mmap
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import uvloop

from swarmgate.accounts import service
from swarmgate.accounts.keys import Principal, new_id, utcnow
from swarmgate.billing.pricing import Pricing
from swarmgate.billing.service import Billing
from swarmgate.billing.settlement import (
    SEGMENT_BYTES,
    PendingCharge,
    _Segment,
    _SqliteJournal,
    _write_plan,
    plan_batch,
)
from swarmgate.store.db import create_engine, migrate


async def _database(path: Path) -> tuple[str, str]:
    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    await migrate(engine)
    developer = await service.create_account(engine, name="bench", credit_micros=10**12)
    provider = await service.create_account(engine, name="provider", provider=True)
    await engine.dispose()
    return developer["id"], provider["id"]


_JOB_IDS = itertools.count()


def _charges(n: int, developer: str, provider: str) -> list[PendingCharge]:
    return [
        PendingCharge(
            # Ordered, as the gateway's are (``new_job_id``): the key index is appended to.
            job_id=f"chatcmpl-bench{next(_JOB_IDS):012x}",
            account_id=developer,
            key_id="key_bench",
            sandbox=False,
            model="smollm2-135m-instruct-q4_1",
            device_id="dev_bench",
            provider_account_id=provider,
            prompt_tokens=12,
            completion_tokens=16,
            charged_micros=1,
            provider_micros=0,
            platform_micros=1,
            created_at=utcnow(),
        )
        for _ in range(n)
    ]


def _cpu_per(n: int, run: object) -> float:
    start = time.process_time()
    run()  # type: ignore[operator]
    return (time.process_time() - start) / n * 1e6


def _posting(journal: _SqliteJournal, charges: list[PendingCharge], group: int) -> None:
    conn = journal._connection()
    for i in range(0, len(charges), group):
        plan = plan_batch(charges[i : i + group], for_sqlite=True)
        conn.execute("BEGIN IMMEDIATE")
        _write_plan(conn, plan)
        conn.execute("COMMIT")


def _mapped_append(directory: Path, charges: list[PendingCharge]) -> float:
    """The alternative to ``os.write`` per charge: the segment allocated up front and
    mapped, each record copied in (body, then its newline). Same durability against a
    crash of the process; no system call per charge."""
    fd = os.open(directory / "mapped.log", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, SEGMENT_BYTES)
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        mapped = mmap.mmap(fd, SEGMENT_BYTES, flags=flags)
        start = time.process_time()
        at = 0
        for charge in charges:
            body = charge.journal_record()[:-1]
            end = at + len(body)
            if end >= SEGMENT_BYTES:
                at, end = 0, len(body)
            mapped[at:end] = body
            mapped[end] = 10
            at = end + 1
        cpu = time.process_time() - start
        mapped.close()
    finally:
        os.close(fd)
    return cpu / len(charges) * 1e6


async def _hop(n: int) -> float:
    pool = ThreadPoolExecutor(max_workers=1)
    loop = asyncio.get_running_loop()
    for _ in range(200):
        await loop.run_in_executor(pool, int)
    start = time.process_time()
    for _ in range(n):
        await loop.run_in_executor(pool, int)
    pool.shutdown()
    return (time.process_time() - start) / n * 1e6


async def _request_billing(path: Path, developer: str, provider: str, n: int) -> float:
    """Main-thread CPU per request of a hold and its settlement, as the request path
    makes them (uvloop, the writer thread posting in the background)."""
    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    billing = Billing(engine)
    await billing.start()
    principal = Principal(account_id=developer, key_id="key_bench", mode="live")
    pricing = Pricing(input_per_1m_micros=100_000, output_per_1m_micros=200_000)

    async def one() -> None:
        # As ``api/running.py`` calls them: the fast paths, the general ones if they decline.
        model = "smollm2-135m-instruct-q4_1"
        amount = billing.quote(pricing, ("Say hello",), 16)
        job_id = new_id("job")
        hold = billing.hold_now(principal, model, pricing, amount, job_id)
        if hold is None:
            hold = await billing.hold(
                principal, model=model, pricing=pricing, amount_micros=amount, job_id=job_id
            )
        if billing.settle_now(hold, 12, 16, "dev_bench", provider, model, pricing) is None:
            await billing.settle(
                hold,
                prompt_tokens=12,
                completion_tokens=16,
                device_id="dev_bench",
                provider_account_id=provider,
            )

    try:
        for _ in range(200):
            await one()
        start = time.thread_time()
        for _ in range(n):
            await one()
        return (time.thread_time() - start) / n * 1e6
    finally:
        await billing.stop()
        await engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args(argv)
    n = args.n
    with tempfile.TemporaryDirectory(prefix="swarmgate-settle-") as tmp:
        path = Path(tmp) / "bench.db"
        developer, provider = asyncio.run(_database(path))
        journal = _SqliteJournal(str(path), batch_max=512, post_interval_s=0.05)
        rows = {
            f"posting, {group} charge(s) per transaction": _cpu_per(
                n, lambda group=group: _posting(journal, _charges(n, developer, provider), group)
            )
            for group in (1, 64, 512)
        }
        for group in (1, 16):
            appended = _charges(n, developer, provider)
            segment = _Segment.create(Path(tmp))
            rows[f"journal append, {group} charge(s) per write"] = _cpu_per(
                n,
                lambda appended=appended, segment=segment, group=group: [
                    segment.append(b"".join([c.journal_record() for c in appended[i : i + group]]))
                    for i in range(0, n, group)
                ],
            )
            segment.remove()
        rows["journal append into a memory map (measured, not used)"] = _mapped_append(
            Path(tmp), _charges(n, developer, provider)
        )
        if journal._conn is not None:
            journal._conn.close()
        rows["a request's billing on the event loop (hold + settle, uvloop)"] = uvloop.run(
            _request_billing(path, developer, provider, n)
        )
        # What the two secondary indexes of ``charges`` (by account and by provider, for
        # usage and earnings) cost the posting.
        journal._conn = None
        conn = journal._connection()
        conn.execute("DROP INDEX ix_charges_account_created")
        conn.execute("DROP INDEX ix_charges_provider_created")
        rows["posting, 512 per transaction, without charges' two secondary indexes"] = _cpu_per(
            n, lambda: _posting(journal, _charges(n, developer, provider), 512)
        )
        conn.close()
    rows["thread round trip (asyncio)"] = asyncio.run(_hop(n))
    rows["thread round trip (uvloop)"] = uvloop.run(_hop(n))
    width = max(len(name) for name in rows)
    for name, micros in rows.items():
        print(f"{name:<{width}}  {micros:7.1f} us CPU per charge")
    return 0


if __name__ == "__main__":
    sys.exit(main())
