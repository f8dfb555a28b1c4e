"""Asynchronous jobs (``POST /v1/jobs``): stored first, run by a bounded pool of workers.

A job survives a gateway restart: on start, jobs left ``queued`` or ``running`` by a
previous process are queued again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from swarmgate.accounts.keys import Principal
from swarmgate.billing.service import Billing, RequestHold
from swarmgate.catalog import Catalog, Pricing
from swarmgate.errors import ModelNotFound, SwarmgateError
from swarmgate.protocol import ChatMessage, SamplingParams
from swarmgate.routing.choice import route_from_json
from swarmgate.routing.dispatch import Execution, JobSpec
from swarmgate.routing.joblog import attempt_rows
from swarmgate.store.tables import api_keys, job_attempts, jobs

log = logging.getLogger("swarmgate.jobs")


class BackgroundJobs:
    def __init__(
        self,
        engine: AsyncEngine,
        new_execution: Callable[[JobSpec], Execution],
        billing: Billing,
        catalog: Catalog,
        price_of: Callable[[str | None, str], Pricing],
        cloud_price: Callable[[str, bool], Pricing] | None = None,
        workers: int = 32,
    ) -> None:
        self._price_of = price_of
        self._cloud_price = cloud_price
        self._engine = engine
        self._billing = billing
        self._catalog = catalog
        self._new_execution = new_execution
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._workers = workers
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        async with self._engine.begin() as conn:
            rows = (
                await conn.execute(
                    select(jobs.c.id)
                    .where(jobs.c.kind == "async", jobs.c.status.in_(("queued", "running")))
                    .order_by(jobs.c.created_at)
                )
            ).all()
            if rows:
                await conn.execute(
                    update(jobs)
                    .where(jobs.c.id.in_([r.id for r in rows]))
                    .values(status="queued", started_at=None)
                )
        for row in rows:
            self._queue.put_nowait(row.id)
        self._tasks = [
            asyncio.create_task(self._work(), name=f"job-worker-{i}") for i in range(self._workers)
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def insert(
        self,
        conn: AsyncConnection,
        spec: JobSpec,
        request_json: bytes,
        hold_id: str | None = None,
    ) -> datetime:
        """Stores a queued job inside the caller's transaction (its hold's, say);
        ``enqueue`` it once that transaction has committed."""
        now = datetime.now(UTC)
        await conn.execute(
            insert(jobs).values(
                id=spec.job_id,
                account_id=spec.account_id,
                key_id=spec.key_id,
                kind="async",
                model=spec.model,
                status="queued",
                stream=False,
                request_json=request_json.decode(),
                created_at=now,
                hold_id=hold_id,
            )
        )
        return now

    async def submit(self, spec: JobSpec, request_json: bytes) -> datetime:
        """Stores a job without a hold (billing off) and queues it."""
        async with self._engine.begin() as conn:
            created_at = await self.insert(conn, spec, request_json)
        self.enqueue(spec.job_id)
        return created_at

    def enqueue(self, job_id: str) -> None:
        self._queue.put_nowait(job_id)

    async def _work(self) -> None:
        while True:
            job_id = await self._queue.get()
            try:
                await self._run(job_id)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("background job crashed", extra={"job_id": job_id})

    async def _run(self, job_id: str) -> None:
        async with self._engine.begin() as conn:
            row = (await conn.execute(select(jobs).where(jobs.c.id == job_id))).first()
            if row is None or row.status != "queued":
                return
            await conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id)
                .values(status="running", started_at=datetime.now(UTC))
            )
        stored = orjson.loads(row.request_json)
        spec = JobSpec(
            job_id=job_id,
            account_id=row.account_id,
            key_id=row.key_id,
            kind="async",
            model=row.model,
            messages=tuple(ChatMessage(**m) for m in stored["messages"]),
            params=SamplingParams(**stored["params"]),
            stream=False,
            route=route_from_json(stored["route"]) if "route" in stored else None,
            privacy_mode=bool(stored.get("privacy_mode", False)),
        )
        hold: RequestHold | None = None
        try:
            hold = await self._hold(row, spec)
            if hold is not None:
                # Only devices within what the hold covers may take the job.
                spec = replace(spec, route=spec.routing.capped_each({spec.model: hold.pricing}))
        except SwarmgateError as exc:
            await self._finish(
                job_id,
                None,
                {"status": "failed", "error_code": exc.code, "error_message": exc.message},
            )
            return
        execution = self._new_execution(spec)
        try:
            completion = await execution.complete()
        except SwarmgateError as exc:
            if hold is not None:
                await self._billing.void_in_ledger(hold)
            await self._finish(
                job_id,
                execution,
                {"status": "failed", "error_code": exc.code, "error_message": exc.message},
            )
            return
        except BaseException:
            if hold is not None:
                self._billing.void(hold)  # in memory only; the ledger hold stays for a rerun
            raise
        device = execution.device
        values: dict[str, object] = {
            "status": "completed",
            "output": completion.text,
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
            "finish_reason": completion.finish_reason,
            "device_id": device.device_id if device else None,
        }
        if hold is None:
            await self._finish(job_id, execution, values)
            return

        async def write(conn: AsyncConnection) -> None:
            await _write_result(conn, job_id, execution, values)

        try:
            # The result and its charge are committed together: neither exists alone.
            await self._billing.settle_with(
                hold,
                write,
                prompt_tokens=completion.prompt_tokens,
                completion_tokens=completion.completion_tokens,
                device_id=device.device_id if device else None,
                provider_account_id=device.account_id if device else None,
                model=execution.model,
                pricing=self._job_price(execution, spec),
            )
        except SwarmgateError as exc:
            await self._billing.void_in_ledger(hold)
            await self._finish(
                job_id,
                execution,
                {"status": "failed", "error_code": exc.code, "error_message": exc.message},
            )

    def _job_price(self, execution: Execution, spec: JobSpec) -> Pricing:
        """The serving device's price, or the cloud's (only the fee with the account's key)."""
        run = execution.cloud_run
        if execution.inference_type == "cloud" and self._cloud_price is not None:
            return self._cloud_price(spec.model, bool(run and run.byok))
        device = execution.device
        return self._price_of(device.device_id if device else None, execution.model or spec.model)

    async def _hold(self, row: Any, spec: JobSpec) -> RequestHold | None:
        """The job's ledger hold: the one taken at submission if still open, else a new one."""
        if not self._billing.enabled:
            return None
        model = self._catalog.get(spec.model)
        if model is None:
            raise ModelNotFound(f"The model '{spec.model}' is no longer in the catalog.")
        if row.hold_id is not None:
            hold = await self._billing.reopen(
                row.hold_id,
                key_id=row.key_id,
                model=model.id,
                pricing=model.pricing,
                job_id=spec.job_id,
            )
            if hold is not None:
                return hold
        # The hold expired (or the job predates holds): reserve again before running.
        sandbox = await self._is_test_key(row.key_id)
        principal = Principal(
            account_id=row.account_id, key_id=row.key_id, mode="test" if sandbox else "live"
        )
        amount = self._billing.quote(
            model.pricing, (m.content for m in spec.messages), spec.params.max_tokens
        )
        return await self._billing.hold(
            principal,
            model=model.id,
            pricing=model.pricing,
            amount_micros=amount,
            job_id=spec.job_id,
            in_ledger=True,
        )

    async def _is_test_key(self, key_id: str | None) -> bool:
        if key_id is None:
            return False
        async with self._engine.connect() as conn:
            mode = await conn.scalar(select(api_keys.c.mode).where(api_keys.c.id == key_id))
        return mode == "test"

    async def _finish(
        self, job_id: str, execution: Execution | None, values: dict[str, object]
    ) -> None:
        async with self._engine.begin() as conn:
            await _write_result(conn, job_id, execution, values)


async def _write_result(
    conn: AsyncConnection, job_id: str, execution: Execution | None, values: dict[str, object]
) -> None:
    values = dict(values, finished_at=datetime.now(UTC))
    if execution is not None:
        values["latency_ms"] = execution.latency_ms
    await conn.execute(update(jobs).where(jobs.c.id == job_id).values(**values))
    if execution is not None:
        rows = attempt_rows(job_id, execution)
        if rows:
            await conn.execute(insert(job_attempts), rows)
