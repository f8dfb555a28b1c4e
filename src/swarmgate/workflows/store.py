"""Orchestration runs in the database: a row per run, a row per step."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from swarmgate.accounts.keys import new_id, utcnow
from swarmgate.billing.service import usd_number as usd
from swarmgate.store.db import iso, write_transaction
from swarmgate.store.tables import workflow_runs, workflow_steps
from swarmgate.workflows.engine import StepRecord


class WorkflowStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def start(
        self,
        *,
        account_id: str,
        key_id: str | None,
        job_id: str,
        workflow: str,
        requested: str,
        model: str,
        task: str,
        max_steps: int,
        max_cost_micros: int | None,
    ) -> str:
        run_id = new_id("wf")
        async with write_transaction(self._engine) as conn:
            await conn.execute(
                insert(workflow_runs).values(
                    id=run_id,
                    account_id=account_id,
                    key_id=key_id,
                    job_id=job_id,
                    workflow=workflow,
                    requested=requested,
                    model=model,
                    status="running",
                    task=" ".join(task.split())[:200],
                    max_steps=max_steps,
                    max_cost_micros=max_cost_micros,
                    steps_executed=0,
                    total_cost_micros=0,
                    created_at=utcnow(),
                )
            )
        return run_id

    async def step(self, run_id: str, record: StepRecord) -> None:
        async with write_transaction(self._engine) as conn:
            await conn.execute(
                insert(workflow_steps).values(
                    run_id=run_id,
                    step=record.index,
                    name=record.name[:64],
                    status=record.status,
                    tool=record.tool,
                    model=record.model,
                    device_id=record.device_id,
                    job_id=record.job_id,
                    prompt_tokens=record.prompt_tokens,
                    completion_tokens=record.completion_tokens,
                    cost_micros=record.cost_micros,
                    duration_ms=record.duration_ms,
                    error_code=record.error_code,
                    finished_at=utcnow(),
                )
            )
            await conn.execute(
                update(workflow_runs)
                .where(workflow_runs.c.id == run_id)
                .values(
                    steps_executed=workflow_runs.c.steps_executed + 1,
                    total_cost_micros=workflow_runs.c.total_cost_micros + record.cost_micros,
                )
            )

    async def finish(
        self, run_id: str, status: str, stop_reason: str | None, tools: list[str] | None = None
    ) -> None:
        async with write_transaction(self._engine) as conn:
            await conn.execute(
                update(workflow_runs)
                .where(workflow_runs.c.id == run_id)
                .values(status=status, stop_reason=stop_reason, finished_at=utcnow())
            )
            if tools:  # the tool each agent step called, known only after the step
                for index, tool in enumerate(tools, 1):
                    if tool:
                        await conn.execute(
                            update(workflow_steps)
                            .where(
                                workflow_steps.c.run_id == run_id, workflow_steps.c.step == index
                            )
                            .values(tool=tool)
                        )

    async def page(
        self, account_id: str, *, limit: int, offset: int
    ) -> tuple[list[dict[str, Any]], int]:
        async with self._engine.connect() as conn:
            total = await conn.scalar(
                select(func.count())
                .select_from(workflow_runs)
                .where(workflow_runs.c.account_id == account_id)
            )
            rows = (
                await conn.execute(
                    select(workflow_runs)
                    .where(workflow_runs.c.account_id == account_id)
                    .order_by(workflow_runs.c.created_at.desc(), workflow_runs.c.id.desc())
                    .limit(limit)
                    .offset(offset)
                )
            ).all()
        return [_run(row) for row in rows], int(total or 0)

    async def get(self, account_id: str, run_id: str) -> dict[str, Any] | None:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    select(workflow_runs).where(
                        workflow_runs.c.id == run_id, workflow_runs.c.account_id == account_id
                    )
                )
            ).first()
            if row is None:
                return None
            steps = (
                await conn.execute(
                    select(workflow_steps)
                    .where(workflow_steps.c.run_id == run_id)
                    .order_by(workflow_steps.c.step)
                )
            ).all()
        out = _run(row)
        out["steps"] = [
            {
                "index": s.step,
                "name": s.name,
                "status": s.status,
                "tool": s.tool,
                "model": s.model,
                "device_id": s.device_id,
                "job_id": s.job_id,
                "prompt_tokens": s.prompt_tokens,
                "completion_tokens": s.completion_tokens,
                "cost_micros": s.cost_micros,
                "cost_usd": usd(s.cost_micros),
                "duration_ms": s.duration_ms,
                "error_code": s.error_code,
            }
            for s in steps
        ]
        return out


def _run(row: Any) -> dict[str, Any]:
    finished: datetime | None = row.finished_at
    return {
        "id": row.id,
        "object": "workflow",
        "type": row.workflow.upper(),
        "workflow": row.workflow,
        "requested": row.requested,
        "status": row.status.upper(),
        "stop_reason": row.stop_reason,
        "task": row.task,
        "model": row.model,
        "job_id": row.job_id,
        "max_steps": row.max_steps,
        "max_cost_micros": row.max_cost_micros,
        "steps_executed": row.steps_executed,
        "total_cost_micros": row.total_cost_micros,
        "total_cost_usd": usd(row.total_cost_micros),
        "created_at": iso(row.created_at),
        "finished_at": iso(finished),
    }
