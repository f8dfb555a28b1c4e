"""Outgoing webhooks: events raised by settled charges, stored, then delivered with retries.

The path of an event::

    Billing (every settled charge)
      └─ Webhooks.on_charge(ChargeEvent)      synchronous, no IO: a set lookup, an append
           └─ in-memory queue                 only for accounts that have endpoints
                └─ background task            turns charges into events, in batches
                     └─ webhook_deliveries    one row per (endpoint, event), status pending
                          └─ claimed, POSTed  2xx: delivered; otherwise retried, then failed

A delivery is written to the database before it is first sent, so it survives a
restart; a charge still in the in-memory queue when the gateway stops is written by
``stop()``. Only a crash loses the queue (at most one poll interval of events).

**Events** (``{"id", "type", "created", "data"}``; never any prompt or completion text):

``job.completed``    every charge: job id, model, key, tokens, cost, balance after it.
``balance.low``      the available balance fell below ``low_balance_micros`` with this
                     charge: once per crossing (the last balance seen is kept in memory;
                     a top-up that lifts it above the line arms the event again).
``usage.threshold``  the account's spend this calendar month (UTC) reached the
                     endpoint's ``usage_threshold_micros``: at most once a month per
                     endpoint (its event id is derived from the endpoint and the month).

Sandbox (``sg_test_``) charges raise the same events with ``"sandbox": true``, and
their balance and monthly spend are counted apart from real money.

Event ids are derived from what caused them (the job, or the endpoint and month), so a
charge reported twice, or a second gateway reporting the same month, yields the same
id and the unique (endpoint_id, event_id) index stores it once.

**Delivery.** ``POST`` with the headers described in ``webhooks/signing.py``. Any 2xx
answer is success; anything else (3xx included: redirects are not followed) or a
network error is retried after ``webhook_backoff_s * 2 ** (attempts - 1)`` seconds,
capped at 6 hours, until ``webhook_max_attempts`` attempts, when the delivery is
marked failed. Each attempt updates its row (attempts, last status code, last error).
Before sending, a gateway claims a row by pushing its ``next_attempt_at`` past the
request timeout, so several gateways on one database do not send it twice, and a
gateway that dies mid-send leaves the row to be retried once that lease runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import urllib.parse
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
from sqlalchemy import Row, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from swarmgate import __version__
from swarmgate.accounts.keys import new_id, utcnow
from swarmgate.config import GatewaySettings
from swarmgate.errors import NotFound, RequestError
from swarmgate.store.db import as_utc
from swarmgate.store.tables import charges, webhook_deliveries, webhook_endpoints
from swarmgate.webhooks.signing import (
    EVENT_ID_HEADER,
    EVENT_TYPE_HEADER,
    SIGNATURE_HEADER,
    new_secret,
    signature_header,
)

log = logging.getLogger("swarmgate.webhooks")

JOB_COMPLETED = "job.completed"
BALANCE_LOW = "balance.low"
USAGE_THRESHOLD = "usage.threshold"
EVENT_TYPES = (JOB_COMPLETED, BALANCE_LOW, USAGE_THRESHOLD)

# Delivery states: pending -> delivered | failed; a failed attempt stays pending.
PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"

MAX_BACKOFF_S = 6 * 3600.0
MAX_ENDPOINTS_PER_ACCOUNT = 20
_QUEUE_LIMIT = 100_000  # charges waiting to become events; beyond it they are dropped
_UNSAVED_LIMIT = 100_000  # delivery rows waiting for the database to come back
_STORE_BATCH = 500
_CONCURRENCY = 32  # deliveries in flight at once
_LEASE_MARGIN_S = 30.0
_REFRESH_ENDPOINTS_S = 30.0  # picks up endpoints created through another gateway
_ERROR_CHARS = 500
_RESPONSE_SNIPPET_BYTES = 200


@dataclass(frozen=True, slots=True)
class ChargeEvent:
    """One settled charge, as the billing path reports it (amounts in micro-dollars)."""

    account_id: str
    key_id: str | None
    job_id: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cost_micros: int
    available_micros: int  # the account's available balance after this charge
    sandbox: bool


@dataclass(frozen=True, slots=True)
class _Due:
    """A delivery claimed for one attempt, with what sending it needs."""

    id: str
    event_id: str
    event_type: str
    payload: str
    attempts: int
    url: str
    secret: str


@dataclass(frozen=True, slots=True)
class Endpoint:
    id: str
    account_id: str
    events: frozenset[str]
    usage_threshold_micros: int | None


# -- pure rules ----------------------------------------------------------------------
def retry_delay_s(attempts: int, backoff_s: float) -> float:
    """How long to wait after ``attempts`` failed attempts: doubling, capped at 6 h."""
    exponent = min(max(attempts - 1, 0), 32)  # 2**32 times any sane backoff is past the cap
    return min(backoff_s * (1 << exponent), MAX_BACKOFF_S)


def crossed_below(previous: int, current: int, line: int) -> bool:
    return previous >= line > current


def crossed_up(previous: int, current: int, line: int) -> bool:
    return previous < line <= current


def derived_event_id(*parts: str) -> str:
    """A stable event id for a cause, so the same cause is stored once per endpoint."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()
    return f"evt_{digest[:32]}"


def month_of(moment: datetime) -> str:
    return f"{moment.year:04d}-{moment.month:02d}"


def month_start(moment: datetime) -> datetime:
    return datetime(moment.year, moment.month, 1, tzinfo=UTC)


def usd(micros: int) -> str:
    """Micro-dollars as a dollar string with six decimals, from integers only."""
    sign = "-" if micros < 0 else ""
    whole, fraction = divmod(abs(micros), 1_000_000)
    return f"{sign}{whole}.{fraction:06d}"


def check_url(url: str) -> str:
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise RequestError("url must be an absolute http:// or https:// URL.", param="url")
    if parsed.username or parsed.password:
        raise RequestError("url must not carry credentials; sign-in is by signature.", param="url")
    return url


def check_events(events: Sequence[str], usage_threshold_micros: int | None) -> list[str]:
    unknown = [e for e in events if e not in EVENT_TYPES]
    if unknown or not events:
        raise RequestError(
            f"events must be a non-empty subset of {list(EVENT_TYPES)}.", param="events"
        )
    chosen = [e for e in EVENT_TYPES if e in events]  # one order, no duplicates
    wants_usage = USAGE_THRESHOLD in chosen
    if wants_usage and usage_threshold_micros is None:
        raise RequestError(
            "usage.threshold needs usage_threshold_usd.", param="usage_threshold_usd"
        )
    if not wants_usage and usage_threshold_micros is not None:
        raise RequestError(
            "usage_threshold_usd is only used with the usage.threshold event.",
            param="usage_threshold_usd",
        )
    return chosen


def event_body(event_id: str, event_type: str, created: int, data: dict[str, Any]) -> str:
    return orjson.dumps(
        {"id": event_id, "type": event_type, "created": created, "data": data}
    ).decode()


def job_completed_data(event: ChargeEvent) -> dict[str, Any]:
    return {
        "account_id": event.account_id,
        "job_id": event.job_id,
        "key_id": event.key_id,
        "model": event.model,
        "sandbox": event.sandbox,
        "usage": {
            "prompt_tokens": event.prompt_tokens,
            "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens,
        },
        "cost_micros": event.cost_micros,
        "cost_usd": usd(event.cost_micros),
        "available_micros": event.available_micros,
        "available_usd": usd(event.available_micros),
    }


def _unix(value: datetime | None) -> int | None:
    return int(as_utc(value).timestamp()) if value is not None else None


def _parse_events(stored: str) -> frozenset[str]:
    try:
        loaded = orjson.loads(stored)
    except orjson.JSONDecodeError:
        return frozenset()
    if not isinstance(loaded, list):
        return frozenset()
    return frozenset(e for e in loaded if e in EVENT_TYPES)


def describe_endpoint(row: Row[Any]) -> dict[str, Any]:
    threshold = row.usage_threshold_micros
    return {
        "id": row.id,
        "object": "webhook_endpoint",
        "url": row.url,
        "events": [e for e in EVENT_TYPES if e in _parse_events(row.events)],
        "usage_threshold_micros": threshold,
        "usage_threshold_usd": usd(threshold) if threshold is not None else None,
        "created": _unix(row.created_at),
    }


def describe_delivery(row: Row[Any]) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "webhook_delivery",
        "endpoint_id": row.endpoint_id,
        "event_id": row.event_id,
        "event_type": row.event_type,
        "status": row.status,
        "attempts": row.attempts,
        "last_status_code": row.last_status_code,
        "last_error": row.last_error,
        "created": _unix(row.created_at),
        "next_attempt_at": _unix(row.next_attempt_at) if row.status == PENDING else None,
        "delivered_at": _unix(row.delivered_at),
    }


# -- the service ---------------------------------------------------------------------
class Webhooks:
    """Endpoints, the event queue and the delivery loop; one per gateway."""

    def __init__(self, engine: AsyncEngine, settings: GatewaySettings) -> None:
        self._engine = engine
        self._settings = settings
        self._endpoints: dict[str, tuple[Endpoint, ...]] = {}
        self._queue: deque[ChargeEvent] = deque()
        self._dropped = 0
        self._unsaved: list[dict[str, Any]] = []
        self._wake = asyncio.Event()
        # Per (account, sandbox): the last available balance seen, and this month's spend.
        self._last_available: dict[tuple[str, bool], int] = {}
        self._month_spend: dict[tuple[str, bool], tuple[str, int]] = {}
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None

    # -- the event source (the request path) -----------------------------------------
    def on_charge(self, event: ChargeEvent) -> None:
        """Called for every settled charge; O(1), no IO, never raises."""
        try:
            if event.account_id not in self._endpoints:
                return
            if len(self._queue) >= _QUEUE_LIMIT:
                self._dropped += 1
                return
            self._queue.append(event)
            self._wake.set()
        except Exception:
            log.exception("queueing a webhook event failed")

    def has_endpoints(self, account_id: str) -> bool:
        return account_id in self._endpoints

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        self._client = httpx.AsyncClient(
            timeout=self._settings.webhook_timeout_s,
            limits=httpx.Limits(max_connections=_CONCURRENCY, max_keepalive_connections=16),
            follow_redirects=False,
            # A receiver is reached directly, never through a proxy from the environment.
            trust_env=False,
            headers={"User-Agent": f"Swarmgate-Webhooks/{__version__}"},
        )
        await self._load_endpoints()
        self._task = asyncio.create_task(self._run(), name="webhook-delivery")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        interrupted = list(self._inflight)
        for task in list(self._inflight.values()):
            task.cancel()
        await asyncio.gather(*self._inflight.values(), return_exceptions=True)
        self._inflight.clear()
        try:
            await self._store_queued()
            await self._release(interrupted)
        except Exception:
            log.exception("storing webhook events at shutdown failed")
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # -- endpoints ---------------------------------------------------------------------
    async def create_endpoint(
        self,
        account_id: str,
        *,
        url: str,
        events: Sequence[str],
        usage_threshold_micros: int | None = None,
    ) -> dict[str, Any]:
        """Registers an endpoint; the answer carries its signing secret, shown only now."""
        check_url(url)
        chosen = check_events(events, usage_threshold_micros)
        secret = new_secret()
        endpoint_id = new_id("we")
        now = utcnow()
        # Counted outside the writing transaction: on SQLite a read before the first
        # write would make the write fail at once if another writer got in between.
        async with self._engine.connect() as conn:
            count = await conn.scalar(
                select(func.count())
                .select_from(webhook_endpoints)
                .where(
                    webhook_endpoints.c.account_id == account_id,
                    webhook_endpoints.c.disabled_at.is_(None),
                )
            )
        if (count or 0) >= MAX_ENDPOINTS_PER_ACCOUNT:
            raise RequestError(
                f"An account may have at most {MAX_ENDPOINTS_PER_ACCOUNT} webhook "
                "endpoints; delete one first."
            )
        async with self._engine.begin() as conn:
            await conn.execute(
                insert(webhook_endpoints).values(
                    id=endpoint_id,
                    account_id=account_id,
                    url=url,
                    secret=secret,
                    events=orjson.dumps(chosen).decode(),
                    usage_threshold_micros=usage_threshold_micros,
                    created_at=now,
                )
            )
            row = (
                await conn.execute(
                    select(webhook_endpoints).where(webhook_endpoints.c.id == endpoint_id)
                )
            ).one()
        endpoint = Endpoint(endpoint_id, account_id, frozenset(chosen), usage_threshold_micros)
        self._set_account(account_id, (*self._endpoints.get(account_id, ()), endpoint))
        return {**describe_endpoint(row), "secret": secret}

    async def list_endpoints(self, account_id: str) -> list[dict[str, Any]]:
        query = (
            select(webhook_endpoints)
            .where(
                webhook_endpoints.c.account_id == account_id,
                webhook_endpoints.c.disabled_at.is_(None),
            )
            .order_by(webhook_endpoints.c.created_at, webhook_endpoints.c.id)
        )
        async with self._engine.connect() as conn:
            return [describe_endpoint(row) for row in await conn.execute(query)]

    async def delete_endpoint(self, account_id: str, endpoint_id: str) -> None:
        """Disables the endpoint (its delivery log stays) and fails what it still owed."""
        now = utcnow()
        async with self._engine.begin() as conn:
            result = await conn.execute(
                update(webhook_endpoints)
                .where(
                    webhook_endpoints.c.id == endpoint_id,
                    webhook_endpoints.c.account_id == account_id,
                    webhook_endpoints.c.disabled_at.is_(None),
                )
                .values(disabled_at=now)
            )
            if result.rowcount != 1:
                raise NotFound(f"No webhook endpoint with id '{endpoint_id}'.", param="id")
            await conn.execute(
                update(webhook_deliveries)
                .where(
                    webhook_deliveries.c.endpoint_id == endpoint_id,
                    webhook_deliveries.c.status == PENDING,
                )
                .values(status=FAILED, next_attempt_at=None, last_error="the endpoint was deleted")
            )
        remaining = tuple(e for e in self._endpoints.get(account_id, ()) if e.id != endpoint_id)
        self._set_account(account_id, remaining)

    async def deliveries(
        self, account_id: str, endpoint_id: str, *, limit: int = 50
    ) -> list[dict[str, Any]]:
        """The endpoint's delivery log, newest first."""
        async with self._engine.connect() as conn:
            owner = await conn.scalar(
                select(webhook_endpoints.c.id).where(
                    webhook_endpoints.c.id == endpoint_id,
                    webhook_endpoints.c.account_id == account_id,
                    webhook_endpoints.c.disabled_at.is_(None),
                )
            )
            if owner is None:
                # Another account's endpoint is reported exactly like a missing one.
                raise NotFound(f"No webhook endpoint with id '{endpoint_id}'.", param="id")
            rows = await conn.execute(
                select(webhook_deliveries)
                .where(webhook_deliveries.c.endpoint_id == endpoint_id)
                .order_by(webhook_deliveries.c.created_at.desc(), webhook_deliveries.c.id)
                .limit(limit)
            )
            return [describe_delivery(row) for row in rows]

    def _set_account(self, account_id: str, endpoints: tuple[Endpoint, ...]) -> None:
        if endpoints:
            self._endpoints[account_id] = endpoints
        else:
            self._endpoints.pop(account_id, None)
        # Charges went unseen while the account had other (or no) endpoints.
        for sandbox in (False, True):
            self._last_available.pop((account_id, sandbox), None)
            self._month_spend.pop((account_id, sandbox), None)

    async def _load_endpoints(self) -> None:
        query = select(
            webhook_endpoints.c.id,
            webhook_endpoints.c.account_id,
            webhook_endpoints.c.events,
            webhook_endpoints.c.usage_threshold_micros,
        ).where(webhook_endpoints.c.disabled_at.is_(None))
        loaded: dict[str, list[Endpoint]] = {}
        async with self._engine.connect() as conn:
            for row in await conn.execute(query.order_by(webhook_endpoints.c.created_at)):
                endpoint = Endpoint(
                    row.id, row.account_id, _parse_events(row.events), row.usage_threshold_micros
                )
                loaded.setdefault(row.account_id, []).append(endpoint)
        fresh = {account: tuple(found) for account, found in loaded.items()}
        for account_id in set(fresh) | set(self._endpoints):
            if fresh.get(account_id) != self._endpoints.get(account_id):
                self._set_account(account_id, fresh.get(account_id, ()))

    # -- the background task -----------------------------------------------------------
    async def _run(self) -> None:
        refreshed = time.monotonic()
        while True:
            try:
                await self._store_queued()
                if time.monotonic() - refreshed >= _REFRESH_ENDPOINTS_S:
                    refreshed = time.monotonic()
                    await self._load_endpoints()
                await self._send_due()
            except Exception:
                log.exception("the webhook loop failed; it retries at the next poll")
            if self._dropped:
                log.error("webhook queue full: dropped charges", extra={"count": self._dropped})
                self._dropped = 0
            if self._queue:
                await asyncio.sleep(0)
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._settings.webhook_poll_s):
                    await self._wake.wait()
            self._wake.clear()

    async def _store_queued(self) -> None:
        """Turns queued charges into delivery rows and writes them (pending, due now)."""
        while self._queue or self._unsaved:
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), _STORE_BATCH))]
            rows = self._unsaved + await self._events_for(batch)
            self._unsaved = []
            if not rows:
                continue
            try:
                await self._insert(rows)
            except Exception:
                # Kept to be written at the next poll; the events were already derived.
                self._unsaved = rows[-_UNSAVED_LIMIT:]
                raise

    async def _insert(self, rows: list[dict[str, Any]]) -> None:
        async with self._engine.begin() as conn:
            dialect = conn.dialect.name
            if dialect in ("sqlite", "postgresql"):
                make = sqlite.insert if dialect == "sqlite" else postgresql.insert
                statement: Any = make(webhook_deliveries).on_conflict_do_nothing(
                    index_elements=[webhook_deliveries.c.endpoint_id, webhook_deliveries.c.event_id]
                )
            else:
                statement = insert(webhook_deliveries)
            await conn.execute(statement, rows)

    async def _events_for(self, batch: list[ChargeEvent]) -> list[dict[str, Any]]:
        now = utcnow()
        created = int(now.timestamp())
        month = month_of(now)
        await self._seed_month_spend(batch, now)
        low = self._settings.low_balance_micros
        rows: list[dict[str, Any]] = []

        def add(endpoints: Iterable[Endpoint], event_id: str, kind: str, body: str) -> None:
            for endpoint in endpoints:
                rows.append(
                    {
                        "id": new_id("whd"),
                        "endpoint_id": endpoint.id,
                        "event_id": event_id,
                        "event_type": kind,
                        "payload": body,
                        "status": PENDING,
                        "attempts": 0,
                        "next_attempt_at": now,
                        "created_at": now,
                    }
                )

        for event in batch:
            endpoints = self._endpoints.get(event.account_id, ())
            if not endpoints:
                continue
            key = (event.account_id, event.sandbox)

            wanting = [e for e in endpoints if JOB_COMPLETED in e.events]
            if wanting:
                event_id = derived_event_id(JOB_COMPLETED, event.job_id)
                body = event_body(event_id, JOB_COMPLETED, created, job_completed_data(event))
                add(wanting, event_id, JOB_COMPLETED, body)

            # Unknown history: the balance just before this charge is the best guess.
            previous = self._last_available.get(key, event.available_micros + event.cost_micros)
            self._last_available[key] = event.available_micros
            wanting = [e for e in endpoints if BALANCE_LOW in e.events]
            if wanting and low > 0 and crossed_below(previous, event.available_micros, low):
                event_id = derived_event_id(BALANCE_LOW, str(event.sandbox), event.job_id)
                data = {
                    "account_id": event.account_id,
                    "sandbox": event.sandbox,
                    "job_id": event.job_id,
                    "available_micros": event.available_micros,
                    "available_usd": usd(event.available_micros),
                    "threshold_micros": low,
                    "threshold_usd": usd(low),
                }
                add(
                    wanting, event_id, BALANCE_LOW, event_body(event_id, BALANCE_LOW, created, data)
                )

            seen = self._month_spend.get(key)
            if seen is None or seen[0] != month:
                continue  # no endpoint of the account watches its monthly usage
            before = seen[1]
            after = before + event.cost_micros
            self._month_spend[key] = (month, after)
            for endpoint in endpoints:
                threshold = endpoint.usage_threshold_micros
                if USAGE_THRESHOLD not in endpoint.events or threshold is None:
                    continue
                if not crossed_up(before, after, threshold):
                    continue
                event_id = derived_event_id(
                    USAGE_THRESHOLD, endpoint.id, str(event.sandbox), month, str(threshold)
                )
                data = {
                    "account_id": event.account_id,
                    "sandbox": event.sandbox,
                    "endpoint_id": endpoint.id,
                    "month": month,
                    "spend_micros": after,
                    "spend_usd": usd(after),
                    "threshold_micros": threshold,
                    "threshold_usd": usd(threshold),
                }
                add(
                    [endpoint],
                    event_id,
                    USAGE_THRESHOLD,
                    event_body(event_id, USAGE_THRESHOLD, created, data),
                )
        return rows

    async def _seed_month_spend(self, batch: list[ChargeEvent], now: datetime) -> None:
        """Reads this month's spend for accounts that watch it and are not counted yet.

        The charges of this batch are left out of the sum: they are counted one by one
        as the batch is turned into events (billing reports a charge once written).
        """
        month = month_of(now)
        jobs: dict[tuple[str, bool], list[str]] = {}
        for event in batch:
            key = (event.account_id, event.sandbox)
            seen = self._month_spend.get(key)
            if seen is not None and seen[0] == month:
                continue
            watched = any(
                USAGE_THRESHOLD in e.events for e in self._endpoints.get(event.account_id, ())
            )
            if watched:
                jobs.setdefault(key, []).append(event.job_id)
        if not jobs:
            return
        try:
            async with self._engine.connect() as conn:
                for (account_id, sandbox), job_ids in jobs.items():
                    spent = await conn.scalar(
                        select(func.coalesce(func.sum(charges.c.cost_micros), 0)).where(
                            charges.c.account_id == account_id,
                            charges.c.sandbox == sandbox,
                            charges.c.created_at >= month_start(now),
                            charges.c.job_id.not_in(job_ids),
                        )
                    )
                    self._month_spend[(account_id, sandbox)] = (month, int(spent or 0))
        except Exception:
            # The other events of the batch still go out; the month is read again later.
            log.exception("reading this month's spend for usage.threshold failed")

    async def _send_due(self) -> None:
        capacity = _CONCURRENCY - len(self._inflight)
        if capacity <= 0 or self._client is None:
            return
        now = utcnow()
        d, e = webhook_deliveries.c, webhook_endpoints.c
        query = (
            select(
                d.id,
                d.event_id,
                d.event_type,
                d.payload,
                d.attempts,
                e.url,
                e.secret,
                e.disabled_at,
            )
            .join(webhook_endpoints, webhook_endpoints.c.id == d.endpoint_id)
            .where(d.status == PENDING, d.next_attempt_at <= now)
            .order_by(d.next_attempt_at)
            .limit(capacity)
        )
        async with self._engine.connect() as conn:
            due = (await conn.execute(query)).all()
        if not due:
            return
        lease = now + timedelta(seconds=self._settings.webhook_timeout_s + _LEASE_MARGIN_S)
        claimed: list[_Due] = []
        async with self._engine.begin() as conn:
            for row in due:
                if row.disabled_at is not None:
                    await conn.execute(
                        update(webhook_deliveries)
                        .where(d.id == row.id, d.status == PENDING)
                        .values(
                            status=FAILED,
                            next_attempt_at=None,
                            last_error="the endpoint was deleted",
                        )
                    )
                    continue
                result = await conn.execute(
                    update(webhook_deliveries)
                    .where(
                        d.id == row.id,
                        d.status == PENDING,
                        d.attempts == row.attempts,
                        d.next_attempt_at <= now,
                    )
                    .values(next_attempt_at=lease)
                )
                if result.rowcount == 1:
                    claimed.append(
                        _Due(
                            row.id,
                            row.event_id,
                            row.event_type,
                            row.payload,
                            row.attempts,
                            row.url,
                            row.secret,
                        )
                    )
        for delivery in claimed:
            self._inflight[delivery.id] = asyncio.create_task(
                self._attempt(delivery), name=f"webhook-{delivery.id}"
            )

    async def _attempt(self, row: _Due) -> None:
        try:
            status_code, error = await self._post(row)
            await self._record(row, status_code, error)
        except Exception:
            log.exception("recording a webhook attempt failed", extra={"delivery_id": row.id})
        finally:
            self._inflight.pop(row.id, None)
            self._wake.set()  # a slot is free: more due deliveries may go

    async def _post(self, row: _Due) -> tuple[int | None, str | None]:
        assert self._client is not None
        body = row.payload.encode()
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: signature_header(row.secret, body),
            EVENT_ID_HEADER: row.event_id,
            EVENT_TYPE_HEADER: row.event_type,
        }
        try:
            async with self._client.stream(
                "POST", row.url, content=body, headers=headers
            ) as response:
                if 200 <= response.status_code < 300:
                    return response.status_code, None
                snippet = b""
                async for chunk in response.aiter_bytes():
                    snippet += chunk
                    if len(snippet) >= _RESPONSE_SNIPPET_BYTES:
                        break
                text = snippet[:_RESPONSE_SNIPPET_BYTES].decode(errors="replace").strip()
                error = f"HTTP {response.status_code}" + (f": {text}" if text else "")
                return response.status_code, error
        except Exception as exc:  # any failure to reach the receiver is one failed attempt
            message = str(exc)
            error = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
            return None, error[:_ERROR_CHARS]

    async def _record(self, row: _Due, status_code: int | None, error: str | None) -> None:
        attempts = row.attempts + 1
        now = utcnow()
        values: dict[str, Any] = {
            "attempts": attempts,
            "last_status_code": status_code,
            "last_error": error,
        }
        if error is None:
            values.update(status=DELIVERED, delivered_at=now, next_attempt_at=None)
        elif attempts >= self._settings.webhook_max_attempts:
            values.update(status=FAILED, next_attempt_at=None)
        else:
            delay = retry_delay_s(attempts, self._settings.webhook_backoff_s)
            values.update(next_attempt_at=now + timedelta(seconds=delay))
        async with self._engine.begin() as conn:
            await conn.execute(
                update(webhook_deliveries)
                .where(webhook_deliveries.c.id == row.id, webhook_deliveries.c.status == PENDING)
                .values(**values)
            )

    async def _release(self, delivery_ids: list[str]) -> None:
        """Makes deliveries cut off by shutdown due again instead of waiting out the lease."""
        if not delivery_ids:
            return
        async with self._engine.begin() as conn:
            await conn.execute(
                update(webhook_deliveries)
                .where(
                    webhook_deliveries.c.id.in_(delivery_ids),
                    webhook_deliveries.c.status == PENDING,
                )
                .values(next_attempt_at=utcnow())
            )
