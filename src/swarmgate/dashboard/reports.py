"""What the dashboard's pages show, read from the database and the device registry.

Every query here is scoped to one account (the viewer's), except the public network
status, which tells only counts, rates and medians, never whose device or request.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from swarmgate.accounts.keys import utcnow
from swarmgate.billing.earnings import REQUESTS, as_date, day_of, window_start
from swarmgate.catalog import Catalog
from swarmgate.routing.registry import DeviceConnection, DeviceRegistry
from swarmgate.routing.states import ConnectionState
from swarmgate.store.db import as_utc
from swarmgate.store.tables import charges, devices, jobs

USAGE_DAYS = (7, 30, 90)
NETWORK_WINDOW = timedelta(hours=24)
LATENCY_SAMPLE = 2_000  # the newest completed jobs per model whose latencies make the median


# -- a developer's usage -------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ModelUsage:
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_micros: int

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class UsageReport:
    days: list[date]  # every day of the window, oldest first
    models: list[ModelUsage]  # most spent first
    cost: dict[tuple[str, str], int]  # (day ISO, model) → micro-dollars
    requests: dict[tuple[str, str], int]  # (day ISO, model) → requests

    @property
    def total_cost_micros(self) -> int:
        return sum(m.cost_micros for m in self.models)

    @property
    def total_requests(self) -> int:
        return sum(m.requests for m in self.models)

    @property
    def total_tokens(self) -> int:
        return sum(m.tokens for m in self.models)


async def usage_report(
    engine: AsyncEngine, account_id: str, *, days: int, sandbox: bool, now: datetime | None = None
) -> UsageReport:
    """Spend and requests by day (UTC) and model, from ``charges``: the ledger's own rows."""
    since = window_start(now or utcnow(), days)
    async with engine.connect() as conn:
        day = day_of(conn.dialect.name)
        rows = (
            await conn.execute(
                select(
                    day,
                    charges.c.model,
                    REQUESTS,
                    func.coalesce(func.sum(charges.c.prompt_tokens), 0),
                    func.coalesce(func.sum(charges.c.completion_tokens), 0),
                    func.coalesce(func.sum(charges.c.cost_micros), 0),
                )
                .where(
                    charges.c.account_id == account_id,
                    charges.c.sandbox == sandbox,
                    charges.c.created_at >= since,
                )
                .group_by(day, charges.c.model)
            )
        ).all()
    first = since.date()
    window = [first + timedelta(days=i) for i in range(days)]
    cost: dict[tuple[str, str], int] = {}
    requests: dict[tuple[str, str], int] = {}
    per_model: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    for row_day, model, count, prompt, completion, spent in rows:
        key = (as_date(row_day).isoformat(), model)
        # int(): PostgreSQL sums BIGINT as NUMERIC (a Decimal), which int() converts exactly.
        cost[key] = cost.get(key, 0) + int(spent)
        requests[key] = requests.get(key, 0) + int(count)
        totals = per_model[model]
        totals[0] += int(count)
        totals[1] += int(prompt)
        totals[2] += int(completion)
        totals[3] += int(spent)
    models = sorted(
        (ModelUsage(m, t[0], t[1], t[2], t[3]) for m, t in per_model.items()),
        key=lambda m: (-m.cost_micros, -m.requests, m.model),
    )
    return UsageReport(window, models, cost, requests)


# -- a provider's devices ----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class DeviceView:
    id: str
    name: str
    token_prefix: str
    state: str  # online | busy | paused | warming | connecting | offline | suspended
    detail: str  # why paused, what is warming, since when offline
    models: list[str]
    slots_busy: int
    slots: int
    trust_score: float
    jobs_served: int
    jobs_failed: int
    last_seen_at: datetime | None
    engine: str | None
    region: str | None


def describe_state(connection: DeviceConnection | None, suspended: str | None) -> tuple[str, str]:
    """A device's state in a provider's words, with the reason where there is one."""
    if suspended:
        return "suspended", suspended
    if connection is None or connection.state is ConnectionState.CLOSED:
        return "offline", ""
    if connection.state is ConnectionState.PAUSED:
        return "paused", connection.pause_reason or "paused by its owner"
    if connection.state is ConnectionState.CONNECTING:
        return "connecting", ""
    if connection.state is ConnectionState.DRAINING:
        return "draining", "finishing its jobs before it disconnects"
    if connection.warming:
        return "warming", "loading " + ", ".join(sorted(connection.warming))
    if connection.state is ConnectionState.BUSY:
        return "busy", "every slot is running a job"
    return "online", ""


async def provider_devices(
    engine: AsyncEngine, registry: DeviceRegistry, account_id: str
) -> list[DeviceView]:
    query = (
        select(devices)
        .where(devices.c.account_id == account_id, devices.c.revoked_at.is_(None))
        .order_by(devices.c.created_at, devices.c.id)
    )
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    views = []
    for row in rows:
        connection = registry.get(row.id)
        state, detail = describe_state(connection, row.suspended_reason)
        live = connection is not None and connection.state is not ConnectionState.CLOSED
        trust, served, failed = float(row.trust_score or 0.0), row.jobs_served, row.jobs_failed
        if connection is not None:
            # The connected device's profile is current; the row is written now and then.
            profile = connection.profile
            trust = profile.trust
            served = max(int(served or 0), profile.jobs_served)
            failed = max(int(failed or 0), profile.jobs_failed)
        views.append(
            DeviceView(
                id=row.id,
                name=row.name or "",
                token_prefix=row.token_prefix,
                state=state,
                detail=detail,
                models=sorted(connection.models) if live and connection else [],
                slots_busy=len(connection.active) if live and connection else 0,
                slots=connection.slots if live and connection else 0,
                trust_score=trust,
                jobs_served=int(served or 0),
                jobs_failed=int(failed or 0),
                last_seen_at=as_utc(row.last_seen_at) if row.last_seen_at else None,
                engine=row.engine,
                region=row.region,
            )
        )
    return views


# -- the public network status -------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ModelStatus:
    model: str
    description: str
    tier: str
    online: int  # devices that can take a request now, or soon (busy)
    busy: int
    warming: int
    requests: int  # in the window
    completed: int
    median_latency_ms: int | None

    @property
    def availability(self) -> str:
        """The share of the window's requests that were answered, as a percentage."""
        if not self.requests:
            return "—"
        tenths = (self.completed * 1000) // self.requests
        return f"{tenths // 10}.{tenths % 10}%"


@dataclass(frozen=True)
class NetworkStatus:
    models: list[ModelStatus]
    devices_online: int
    measured_at: datetime
    window_hours: int = int(NETWORK_WINDOW.total_seconds() // 3600)


@dataclass
class NetworkStatusCache:
    """The public page is the one anyone may load as often as they like: it is computed at
    most once per ``ttl_s``, by one task, whoever asks."""

    engine: AsyncEngine
    registry: DeviceRegistry
    catalog: Catalog
    ttl_s: float = 10.0
    _value: NetworkStatus | None = None
    _expires: float = 0.0
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def get(self) -> NetworkStatus:
        if self._value is not None and time.monotonic() < self._expires:
            return self._value
        async with self._lock:
            if self._value is None or time.monotonic() >= self._expires:
                self._value = await self._measure()
                self._expires = time.monotonic() + self.ttl_s
        return self._value

    async def _measure(self) -> NetworkStatus:
        now = utcnow()
        since = now - NETWORK_WINDOW
        online: dict[str, int] = defaultdict(int)
        busy: dict[str, int] = defaultdict(int)
        warming: dict[str, int] = defaultdict(int)
        live = 0
        for device in self.registry.devices():
            if device.state in (ConnectionState.READY, ConnectionState.BUSY):
                live += 1
                for model in device.models:
                    online[model] += 1
                    if device.state is ConnectionState.BUSY:
                        busy[model] += 1
            for model in device.warming:
                warming[model] += 1
        async with self.engine.connect() as conn:
            outcomes = (
                await conn.execute(
                    select(jobs.c.model, jobs.c.status, func.count())
                    .where(jobs.c.created_at >= since, jobs.c.status.in_(_FINAL))
                    .group_by(jobs.c.model, jobs.c.status)
                )
            ).all()
            latencies: dict[str, list[int]] = {}
            for model in [m.id for m in self.catalog]:
                sample = (
                    await conn.execute(
                        select(jobs.c.latency_ms)
                        .where(
                            jobs.c.model == model,
                            jobs.c.created_at >= since,
                            jobs.c.status == "completed",
                            jobs.c.latency_ms.is_not(None),
                        )
                        .order_by(jobs.c.created_at.desc())
                        .limit(LATENCY_SAMPLE)
                    )
                ).scalars()
                latencies[model] = [int(v) for v in sample]
        counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for model, status, count in outcomes:
            counts[model][0] += int(count)
            if status == "completed":
                counts[model][1] += int(count)
        models = []
        for model in self.catalog:
            sample_ms = latencies.get(model.id, [])
            requests, completed = counts.get(model.id, [0, 0])
            models.append(
                ModelStatus(
                    model=model.id,
                    description=model.description,
                    tier=model.tier,
                    online=online.get(model.id, 0),
                    busy=busy.get(model.id, 0),
                    warming=warming.get(model.id, 0),
                    requests=requests,
                    completed=completed,
                    median_latency_ms=int(statistics.median(sample_ms)) if sample_ms else None,
                )
            )
        models.sort(key=lambda m: (-m.online, -m.requests, m.model))
        return NetworkStatus(models, live, now)


# Cancelled requests are the caller's choice, not the network's failure: left out.
_FINAL = ("completed", "failed")


def describe_network(status: NetworkStatus) -> dict[str, Any]:
    return {
        "measured_at": status.measured_at.isoformat(),
        "devices_online": status.devices_online,
        "models": [
            {
                "model": m.model,
                "online": m.online,
                "busy": m.busy,
                "warming": m.warming,
                "requests": m.requests,
                "availability": m.availability,
                "median_latency_ms": m.median_latency_ms,
            }
            for m in status.models
        ],
    }
