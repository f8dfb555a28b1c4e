"""``GET /v1/usage``: the caller's spend and balance for a period, by model and by key.

Figures come from ``charges`` (one row per settled job), so they agree with the ledger
to the micro-dollar. A call made with an ``sg_test_`` key reports the sandbox.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query
from sqlalchemy import func, select
from starlette.responses import Response

from swarmgate.api.deps import CurrentPrincipal, GatewayDep
from swarmgate.api.responses import json_response
from swarmgate.billing.earnings import REQUESTS
from swarmgate.billing.service import month_bounds
from swarmgate.billing.service import usd_number as usd
from swarmgate.errors import RequestError
from swarmgate.store.tables import api_keys, charges

router = APIRouter(tags=["billing"])


def _period(start: date | None, end: date | None) -> tuple[datetime, datetime]:
    if start is None and end is None:
        return month_bounds(datetime.now(UTC))
    if start is None or end is None:
        raise RequestError("Give both 'start' and 'end' (YYYY-MM-DD), or neither.", param="start")
    if end < start:
        raise RequestError("'end' is before 'start'.", param="end")
    if (end - start).days > 366:
        raise RequestError("A usage period may span at most 366 days.", param="end")
    first = datetime(start.year, start.month, start.day, tzinfo=UTC)
    last = datetime(end.year, end.month, end.day, tzinfo=UTC) + timedelta(days=1)
    return first, last


@router.get("/v1/usage", summary="Usage and balance for a period", response_model=None)
async def get_usage(
    principal: CurrentPrincipal,
    gateway: GatewayDep,
    start: Annotated[date | None, Query(description="first day (UTC), inclusive")] = None,
    end: Annotated[date | None, Query(description="last day (UTC), inclusive")] = None,
) -> Response:
    period_start, period_end = _period(start, end)
    sandbox = principal.sandbox
    in_period = (
        charges.c.account_id == principal.account_id,
        charges.c.sandbox == sandbox,
        charges.c.created_at >= period_start,
        charges.c.created_at < period_end,
    )
    tokens = charges.c.prompt_tokens + charges.c.completion_tokens
    by_model_query = (
        select(
            charges.c.model,
            REQUESTS.label("requests"),
            func.sum(charges.c.prompt_tokens).label("prompt_tokens"),
            func.sum(charges.c.completion_tokens).label("completion_tokens"),
            func.sum(tokens).label("tokens"),
            func.sum(charges.c.cost_micros).label("cost"),
        )
        .where(*in_period)
        .group_by(charges.c.model)
        .order_by(charges.c.model)
    )
    by_key_query = (
        select(
            charges.c.key_id,
            api_keys.c.name,
            api_keys.c.prefix,
            api_keys.c.daily_spend_cap_micros,
            REQUESTS.label("requests"),
            func.sum(tokens).label("tokens"),
            func.sum(charges.c.cost_micros).label("cost"),
        )
        .select_from(charges.outerjoin(api_keys, api_keys.c.id == charges.c.key_id))
        .where(*in_period)
        .group_by(
            charges.c.key_id, api_keys.c.name, api_keys.c.prefix, api_keys.c.daily_spend_cap_micros
        )
        .order_by(charges.c.key_id)
    )
    await gateway.billing.writer.posted()  # include the answers of the last few ms
    async with gateway.engine.connect() as conn:
        models = (await conn.execute(by_model_query)).all()
        keys = (await conn.execute(by_key_query)).all()
    balance = await gateway.billing.balance(principal.account_id, sandbox=sandbox)
    by_model: dict[str, Any] = {}
    for row in models:
        by_model[row.model] = {
            "requests": int(row.requests),
            "tokens": int(row.tokens or 0),
            "prompt_tokens": int(row.prompt_tokens or 0),
            "completion_tokens": int(row.completion_tokens or 0),
            "cost_micros": int(row.cost or 0),
            "cost_usd": usd(int(row.cost or 0)),
        }
    by_key = []
    for key_row in keys:
        entry: dict[str, Any] = {
            "key_id": key_row.key_id,
            "name": key_row.name,
            "prefix": key_row.prefix,
            "requests": int(key_row.requests),
            "tokens": int(key_row.tokens or 0),
            "cost_micros": int(key_row.cost or 0),
            "daily_spend_cap_micros": key_row.daily_spend_cap_micros,
        }
        if key_row.key_id is not None:
            entry["spent_today_micros"] = await gateway.billing.spent_today(
                key_row.key_id, principal.account_id
            )
        by_key.append(entry)
    total_cost = sum(int(row.cost or 0) for row in models)
    return json_response(
        {
            "object": "usage",
            "mode": "test" if sandbox else "live",
            "period_start": period_start.isoformat().replace("+00:00", "Z"),
            "period_end": (period_end - timedelta(seconds=1)).isoformat().replace("+00:00", "Z"),
            "balance_usd": usd(balance.available_micros),
            "balance_micros": balance.available_micros,
            "held_micros": balance.held_micros,
            "total_requests": sum(int(row.requests) for row in models),
            "total_tokens": sum(int(row.tokens or 0) for row in models),
            "total_cost_micros": total_cost,
            "total_cost_usd": usd(total_cost),
            "by_model": by_model,
            "by_key": by_key,
        }
    )
