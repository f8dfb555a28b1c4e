"""What providers and their devices earned, read from the ``charges`` table.

Every settled job leaves one ``charges`` row naming the device that ran it, the
provider account that owns the device and the provider's share (``provider_micros``).
Sandbox rows are play money nobody earns, so every report leaves them out.

Days are UTC calendar days: "the last 30 days" is today and the 29 before it, so each
``by_day`` bucket is a whole day and the buckets add up to the window's totals. The
database groups rows by (day, model, device), at most (days x models x devices) rows, and
the breakdowns are summed from those here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Date, case, cast, false, func, literal_column, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from swarmgate.billing.payouts import ProviderFunds, provider_funds
from swarmgate.billing.pricing import MAX_AMOUNT_MICROS
from swarmgate.errors import RequestError
from swarmgate.store.tables import charges, devices

MICROS_PER_USD = 1_000_000
MAX_REPORT_DAYS = 366
_USD_TEXT = re.compile(r"(\d{1,9})(?:\.(\d{1,6}))?")


# -- money as text: integers only ------------------------------------------------------
def format_usd(micros: int) -> str:
    """``12_345_678`` → ``"12.345678"``: always six decimals, exact, no float involved."""
    if not isinstance(micros, int) or isinstance(micros, bool):
        raise TypeError(f"micros must be an int, got {type(micros).__name__}")
    sign = "-" if micros < 0 else ""
    dollars, rest = divmod(abs(micros), MICROS_PER_USD)
    return f"{sign}{dollars}.{rest:06d}"


def parse_usd(text: str, param: str = "amount_usd") -> int:
    """``"12.5"`` → ``12_500_000`` micro-dollars; more than six decimals is refused."""
    match = _USD_TEXT.fullmatch(text.strip())
    if match is None:
        raise RequestError(
            f"{param} must be dollars as a decimal string with at most 6 decimals, "
            f'such as "12.50"; got {text[:40]!r}',
            param=param,
        )
    whole, fraction = match.group(1), match.group(2) or ""
    micros = int(whole) * MICROS_PER_USD + int(fraction.ljust(6, "0"))
    if not 0 < micros <= MAX_AMOUNT_MICROS:
        raise RequestError(f"{param} must be more than 0.000000", param=param)
    return micros


# -- reports -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Totals:
    jobs: int = 0
    tokens: int = 0
    earned_micros: int = 0

    def __add__(self, other: Totals) -> Totals:
        return Totals(
            self.jobs + other.jobs,
            self.tokens + other.tokens,
            self.earned_micros + other.earned_micros,
        )


@dataclass(frozen=True, slots=True)
class DeviceTotals:
    device_id: str | None  # None: jobs whose device row is gone
    name: str | None
    totals: Totals


@dataclass(frozen=True, slots=True)
class ProviderReport:
    account_id: str
    days: int
    since: datetime  # the window's first instant (UTC midnight)
    funds: ProviderFunds
    window: Totals
    all_time: Totals
    by_day: list[tuple[date, Totals]]  # every day of the window, oldest first, zeros included
    by_model: list[tuple[str, Totals]]  # most earned first
    by_device: list[DeviceTotals]  # most earned first


@dataclass(frozen=True, slots=True)
class DeviceReport:
    device_id: str
    name: str
    account_id: str
    today: Totals
    last_30_days: Totals
    all_time: Totals
    funds: ProviderFunds  # the owning account's, shared by all its devices


def window_start(now: datetime, days: int) -> datetime:
    """UTC midnight ``days - 1`` days before ``now``'s day: the start of a ``days``-day window."""
    if not 1 <= days <= MAX_REPORT_DAYS:
        raise RequestError(f"days must be 1..{MAX_REPORT_DAYS}, got {days}", param="days")
    today = now.astimezone(UTC).date()
    return datetime.combine(today - timedelta(days=days - 1), time(), tzinfo=UTC)


def day_of(dialect_name: str) -> ColumnElement[Any]:
    if dialect_name == "postgresql":
        # A literal, not a bound parameter: GROUP BY must see the same expression as SELECT.
        return cast(func.timezone(literal_column("'UTC'"), charges.c.created_at), Date)
    return func.date(charges.c.created_at)  # SQLite keeps UTC text: 'YYYY-MM-DD HH:MM:SS…'


def as_date(value: Any) -> date:
    return value if isinstance(value, date) else date.fromisoformat(str(value))


# A request whose stream was continued on another device is charged in parts: the last
# part keeps the job's id, the earlier ones are "<id>.1", "<id>.2" … (billing/service.py).
# A developer made one request, so only the part without a suffix counts as one.
REQUESTS = func.coalesce(func.sum(case((charges.c.job_id.contains("."), 0), else_=1)), 0)

_TOKENS = func.coalesce(func.sum(charges.c.prompt_tokens + charges.c.completion_tokens), 0)
_EARNED = func.coalesce(func.sum(charges.c.provider_micros), 0)


def _earned_by(account_id: str) -> list[ColumnElement[bool]]:
    return [charges.c.provider_account_id == account_id, charges.c.sandbox == false()]


async def _totals(conn: AsyncConnection, conditions: Iterable[ColumnElement[bool]]) -> Totals:
    # int(): PostgreSQL sums BIGINT as NUMERIC (a Decimal), which int() converts exactly.
    row = (await conn.execute(select(func.count(), _TOKENS, _EARNED).where(*conditions))).one()
    return Totals(int(row[0]), int(row[1]), int(row[2]))


def _ranked(totals: dict[Any, Totals]) -> list[tuple[Any, Totals]]:
    return sorted(totals.items(), key=lambda item: (-item[1].earned_micros, str(item[0])))


async def provider_report(
    engine: AsyncEngine, account_id: str, *, days: int, now: datetime, lock_days: int
) -> ProviderReport:
    since = window_start(now, days)
    async with engine.connect() as conn:
        day = day_of(conn.dialect.name)
        grouped = (
            await conn.execute(
                select(day, charges.c.model, charges.c.device_id, func.count(), _TOKENS, _EARNED)
                .where(*_earned_by(account_id), charges.c.created_at >= since)
                .group_by(day, charges.c.model, charges.c.device_id)
            )
        ).all()
        all_time = await _totals(conn, _earned_by(account_id))
        names = dict(
            (
                await conn.execute(
                    select(devices.c.id, devices.c.name).where(devices.c.account_id == account_id)
                )
            ).all()
        )
        funds = await provider_funds(conn, account_id, now=now, lock_days=lock_days)

    first_day = since.date()
    by_day = {first_day + timedelta(days=i): Totals() for i in range(days)}
    by_model: dict[str, Totals] = {}
    by_device: dict[str | None, Totals] = {}
    for row_day, model, device_id, jobs, tokens, earned in grouped:
        part = Totals(int(jobs), int(tokens), int(earned))
        when = as_date(row_day)
        by_day[when] = by_day.get(when, Totals()) + part
        by_model[model] = by_model.get(model, Totals()) + part
        by_device[device_id] = by_device.get(device_id, Totals()) + part
    window = sum(by_model.values(), Totals())
    return ProviderReport(
        account_id=account_id,
        days=days,
        since=since,
        funds=funds,
        window=window,
        all_time=all_time,
        by_day=sorted(by_day.items()),
        by_model=_ranked(by_model),
        by_device=[
            DeviceTotals(device_id, names.get(device_id) if device_id else None, totals)
            for device_id, totals in _ranked(by_device)
        ],
    )


async def device_report(
    engine: AsyncEngine,
    *,
    device_id: str,
    name: str,
    account_id: str,
    now: datetime,
    lock_days: int,
) -> DeviceReport:
    # Filtering on the provider account too lets the (provider, created_at) index serve it.
    mine = [*_earned_by(account_id), charges.c.device_id == device_id]
    async with engine.connect() as conn:
        today = await _totals(conn, [*mine, charges.c.created_at >= window_start(now, 1)])
        month = await _totals(conn, [*mine, charges.c.created_at >= window_start(now, 30)])
        all_time = await _totals(conn, mine)
        funds = await provider_funds(conn, account_id, now=now, lock_days=lock_days)
    return DeviceReport(
        device_id=device_id,
        name=name,
        account_id=account_id,
        today=today,
        last_30_days=month,
        all_time=all_time,
        funds=funds,
    )
