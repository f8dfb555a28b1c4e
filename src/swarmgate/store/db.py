"""Database engine: SQLite (WAL) by default, PostgreSQL when the URL says so."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, event
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def as_utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything we store is UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def iso(value: datetime | None) -> str | None:
    return as_utc(value).isoformat() if value is not None else None


def sqlite_datetime(value: datetime) -> str:
    """An instant as SQLAlchemy's SQLite DateTime stores it: UTC, ``YYYY-MM-DD
    HH:MM:SS.ffffff`` (``isoformat`` takes about half the time of ``astimezone`` and
    ``strftime``, on every row of the job log)."""
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    return value.isoformat(" ", "microseconds")[:26]


_THREE_DIGITS = tuple(f"{n:03d}" for n in range(1000))


class SqliteInstants:
    """``sqlite_datetime`` for a run of instants close together (a batch of rows): the
    text up to the second is made once per second, the microseconds from a table.
    ``isoformat`` is the dearest step of turning a row into SQLite values."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second: datetime | None = None
        self._prefix = ""

    def __call__(self, value: datetime) -> str:
        if value.tzinfo is not UTC:
            return sqlite_datetime(value)
        micro = value.microsecond
        second = value.replace(microsecond=0)
        if second != self._second:
            self._second = second
            self._prefix = sqlite_datetime(second)[:20]  # "YYYY-MM-DD HH:MM:SS."
        return self._prefix + _THREE_DIGITS[micro // 1000] + _THREE_DIGITS[micro % 1000]


def sqlite_value(value: Any) -> Any:
    """A Python value as SQLAlchemy's SQLite types store it, for raw DBAPI writes."""
    if isinstance(value, datetime):
        return sqlite_datetime(value)
    if isinstance(value, bool):
        return int(value)
    return value


def sqlite_path(engine: AsyncEngine) -> str | None:
    """The database file of a SQLite engine (None for any other database)."""
    if engine.dialect.name != "sqlite":
        return None
    return engine.url.database or ":memory:"


def create_engine(database_url: str) -> AsyncEngine:
    if database_url.startswith("sqlite"):
        path = database_url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(database_url, connect_args={"timeout": 30})
        event.listen(engine.sync_engine, "connect", apply_sqlite_pragmas)
        return engine
    return create_async_engine(database_url, pool_size=10, max_overflow=20, pool_pre_ping=True)


@asynccontextmanager
async def write_transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A write transaction that may read first. On SQLite it takes the write lock up front
    (``BEGIN IMMEDIATE``): Python's sqlite3 runs reads before the first write outside the
    transaction, so a read-then-write would act on stale data, and a deferred transaction
    that upgrades to a writer gets SQLITE_BUSY at once instead of waiting its turn."""
    async with engine.begin() as conn:
        if conn.dialect.name == "sqlite":
            await conn.exec_driver_sql("BEGIN IMMEDIATE")
        yield conn


def apply_sqlite_pragmas(dbapi_connection: Any, _record: Any = None) -> None:
    """Every SQLite connection's settings, for SQLAlchemy's and the raw ones alike."""
    cursor = dbapi_connection.cursor()
    # WAL lets readers run beside the one writer; NORMAL sync is durable across app crashes.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def _upgrade(connection: Connection) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


# Gateways that start together on one PostgreSQL migrate one at a time (any fixed number).
MIGRATION_LOCK = 0x5347_4D49


async def migrate(engine: AsyncEngine) -> None:
    """Bring the schema to the newest migration (idempotent). On PostgreSQL a transaction
    advisory lock makes gateways starting together take turns; the later ones find the
    schema current."""
    async with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            await connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
        await connection.run_sync(_upgrade)
