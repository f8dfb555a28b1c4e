"""The job log's raw SQLite writes store values exactly as SQLAlchemy's own types do."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import insert, select

from swarmgate.accounts import service
from swarmgate.routing.joblog import _insert_many_sqlite
from swarmgate.store.db import SqliteInstants, create_engine, migrate, sqlite_datetime
from swarmgate.store.tables import job_attempts, jobs


@pytest.mark.parametrize(
    "value",
    [
        datetime(2026, 12, 3, 15, 4, 5, 123456, tzinfo=UTC),
        datetime(2026, 12, 3, 15, 4, 5, tzinfo=UTC),  # no microseconds: still six digits
        datetime(2026, 12, 3, 17, 4, 5, 1, tzinfo=timezone(timedelta(hours=2))),
        datetime(1999, 1, 1, 0, 0, tzinfo=timezone(timedelta(hours=-5))),
    ],
)
def test_instants_are_formatted_as_sqlalchemy_stores_them(value: datetime) -> None:
    assert sqlite_datetime(value) == value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def test_a_run_of_instants_is_formatted_like_each_alone() -> None:
    """The per-second cache gives what ``sqlite_datetime`` gives, across second, day and
    year boundaries, out of order, and for instants in other time zones."""
    start = datetime(2026, 12, 31, 23, 59, 58, 999_000, tzinfo=UTC)
    values = [start + timedelta(microseconds=n * 377) for n in range(12_000)]
    values += [
        start,
        start - timedelta(days=400, microseconds=1),
        datetime(2027, 1, 1, 1, 0, 0, 5, tzinfo=timezone(timedelta(hours=1))),
        datetime(2027, 1, 1, 0, 0, 0, 0, tzinfo=UTC),
        datetime(2027, 1, 1, 0, 0, 0, 999_999, tzinfo=UTC),
    ]
    instants = SqliteInstants()
    assert [instants(value) for value in values] == [sqlite_datetime(v) for v in values]


async def test_raw_rows_read_back_like_rows_written_by_sqlalchemy(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'log.db'}")
    await migrate(engine)
    account = await service.create_account(engine, name="dev")
    when = datetime(2026, 12, 3, 15, 4, 5, tzinfo=UTC)

    def job(job_id: str, stream: bool) -> dict[str, object]:
        return {
            "id": job_id,
            "account_id": account["id"],
            "key_id": None,
            "kind": "chat",
            "model": "m",
            "status": "completed",
            "stream": stream,
            "device_id": None,
            "prompt_tokens": 3,
            "completion_tokens": None,
            "finish_reason": "stop",
            "error_code": None,
            "error_message": None,
            "request_json": None,
            "output": None,
            "created_at": when,
            "started_at": when + timedelta(microseconds=7),
            "finished_at": None,
            "latency_ms": 12,
        }

    attempt = {
        "job_id": "job_raw",
        "attempt": 1,
        "device_id": "dev_1",
        "outcome": "succeeded",
        "error_code": None,
        "started_at": when,
        "first_token_ms": None,
        "duration_ms": 5,
    }
    try:
        async with engine.begin() as conn:
            await _insert_many_sqlite(conn, jobs, [job("job_raw", True), job("job_raw2", False)])
            await _insert_many_sqlite(conn, job_attempts, [attempt])
            await conn.execute(insert(jobs), [job("job_orm", True)])
            await conn.execute(insert(job_attempts), [attempt | {"job_id": "job_orm"}])
        async with engine.connect() as conn:
            rows = {r.id: r for r in await conn.execute(select(jobs))}
            tried = {r.job_id: r for r in await conn.execute(select(job_attempts))}
    finally:
        await engine.dispose()
    raw, orm = rows["job_raw"], rows["job_orm"]
    columns = [c.name for c in jobs.columns if c.name != "id"]
    assert [getattr(raw, c) for c in columns] == [getattr(orm, c) for c in columns]
    assert raw.stream is True and rows["job_raw2"].stream is False
    assert raw.started_at.replace(tzinfo=UTC) == when + timedelta(microseconds=7)
    assert tried["job_raw"].started_at == tried["job_orm"].started_at
