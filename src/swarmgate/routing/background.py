"""Asynchronous jobs (``POST /v1/jobs``): stored first, run by a bounded pool of workers.

A job survives a gateway restart: on start, jobs left ``queued`` or ``running`` by a
previous process are queued again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime

import orjson
from sqlalchemy import insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from swarmgate.errors import SwarmgateError
from swarmgate.protocol import ChatMessage, SamplingParams
from swarmgate.routing.dispatch import Execution, JobSpec
from swarmgate.routing.joblog import attempt_rows
from swarmgate.store.tables import job_attempts, jobs

log = logging.getLogger("swarmgate.jobs")


class BackgroundJobs:
    def __init__(
        self,
        engine: AsyncEngine,
        new_execution: Callable[[JobSpec], Execution],
        workers: int = 32,
    ) -> None:
        self._engine = engine
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

    async def submit(self, spec: JobSpec, request_json: bytes) -> datetime:
        now = datetime.now(UTC)
        async with self._engine.begin() as conn:
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
                )
            )
        self._queue.put_nowait(spec.job_id)
        return now

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
        )
        execution = self._new_execution(spec)
        values: dict[str, object]
        try:
            completion = await execution.complete()
            values = {
                "status": "completed",
                "output": completion.text,
                "prompt_tokens": completion.prompt_tokens,
                "completion_tokens": completion.completion_tokens,
                "finish_reason": completion.finish_reason,
                "device_id": execution.device.device_id if execution.device else None,
            }
        except SwarmgateError as exc:
            values = {"status": "failed", "error_code": exc.code, "error_message": exc.message}
        values.update(finished_at=datetime.now(UTC), latency_ms=execution.latency_ms)
        async with self._engine.begin() as conn:
            await conn.execute(update(jobs).where(jobs.c.id == job_id).values(**values))
            rows = attempt_rows(job_id, execution)
            if rows:
                await conn.execute(insert(job_attempts), rows)
