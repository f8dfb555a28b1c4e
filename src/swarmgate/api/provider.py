"""Providers' money: earnings, payout requests, the admin's payout decisions, a device's own
earnings.

Every amount goes out twice: ``*_micros`` (an integer, the real value) and ``*_usd``, a
display string made from that integer (``"12.345678"``). Amounts come in the same way:
``amount_micros`` as an integer, or ``amount_usd`` as a decimal string (a JSON float is
refused rather than rounded).
"""

from __future__ import annotations

from collections.abc import Awaitable
from datetime import date
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.responses import Response

from swarmgate.accounts.keys import Principal, utcnow
from swarmgate.api.deps import AdminDep, CurrentDevice, CurrentPrincipal, GatewayDep, read_body
from swarmgate.api.responses import json_response
from swarmgate.api.schemas import parse_body, parse_optional_body
from swarmgate.billing.earnings import (
    MAX_REPORT_DAYS,
    DeviceReport,
    ProviderReport,
    Totals,
    device_report,
    format_usd,
    parse_usd,
    provider_report,
)
from swarmgate.billing.payouts import Payout, Payouts, PayoutStatus, ProviderFunds
from swarmgate.billing.pricing import MAX_AMOUNT_MICROS
from swarmgate.errors import Conflict, Forbidden, IllegalTransition
from swarmgate.gateway import Gateway
from swarmgate.store.db import iso

router = APIRouter(tags=["providers"])

_MAX_BODY = 16_384
_MAX_DOLLARS = MAX_AMOUNT_MICROS // 1_000_000


# -- bodies ------------------------------------------------------------------------------
class PayoutRequestBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    amount_micros: int | None = Field(default=None, ge=1, le=MAX_AMOUNT_MICROS)
    amount_usd: str | int | None = None
    destination: str | None = Field(default=None, max_length=400)

    @field_validator("amount_usd", mode="before")
    @classmethod
    def _no_float_dollars(cls, value: object) -> object:
        if isinstance(value, float | bool):
            raise ValueError('send dollars as a string such as "12.50" or a whole number')
        if isinstance(value, int) and not isinstance(value, bool) and not 0 < value <= _MAX_DOLLARS:
            raise ValueError(f"must be 1..{_MAX_DOLLARS} dollars")
        return value

    @model_validator(mode="after")
    def _one_amount(self) -> PayoutRequestBody:
        if (self.amount_micros is None) == (self.amount_usd is None):
            raise ValueError("send exactly one of amount_micros and amount_usd")
        return self

    def micros(self) -> int:
        if self.amount_micros is not None:
            return self.amount_micros
        if isinstance(self.amount_usd, int):
            return self.amount_usd * 1_000_000
        assert self.amount_usd is not None
        return parse_usd(self.amount_usd)


class PayoutDecisionBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    note: str | None = Field(default=None, max_length=2_000)


# -- shapes ------------------------------------------------------------------------------
def _money(prefix: str, micros: int) -> dict[str, Any]:
    return {f"{prefix}_micros": micros, f"{prefix}_usd": format_usd(micros)}


def _totals(totals: Totals) -> dict[str, Any]:
    return {"jobs": totals.jobs, "tokens": totals.tokens, **_money("earned", totals.earned_micros)}


def _funds(funds: ProviderFunds) -> dict[str, Any]:
    bonus = None
    if funds.bonus_micros:
        bonus = {
            **_money("amount", funds.bonus_micros),
            **_money("locked", funds.bonus_locked_micros),
            "unlocks_at": iso(funds.bonus_unlocks_at),
        }
    return {
        **_money("balance", funds.balance_micros),
        **_money("withdrawable", funds.withdrawable_micros),
        **_money("pending_payouts", funds.pending_micros),
        **_money("paid_out", funds.paid_micros),
        "welcome_bonus": bonus,
    }


def describe_payout(payout: Payout) -> dict[str, Any]:
    return {
        "id": payout.id,
        "object": "payout",
        "account_id": payout.account_id,
        **_money("amount", payout.amount_micros),
        "status": payout.status.value,
        "destination": payout.destination,
        "note": payout.note,
        "transaction_id": payout.transaction_id,
        "created_at": iso(payout.created_at),
        "decided_at": iso(payout.decided_at),
        "paid_at": iso(payout.paid_at),
    }


def describe_report(report: ProviderReport, threshold_micros: int) -> dict[str, Any]:
    def day(when: date, totals: Totals) -> dict[str, Any]:
        return {"date": when.isoformat(), **_totals(totals)}

    return {
        "object": "provider.earnings",
        "account_id": report.account_id,
        "days": report.days,
        "since": iso(report.since),
        **_funds(report.funds),
        **_money("payout_threshold", threshold_micros),
        "totals": _totals(report.window),
        "all_time": _totals(report.all_time),
        "by_day": [day(when, totals) for when, totals in report.by_day],
        "by_model": [{"model": model, **_totals(totals)} for model, totals in report.by_model],
        "by_device": [
            {"device_id": d.device_id, "name": d.name, **_totals(d.totals)}
            for d in report.by_device
        ],
    }


def describe_device_report(report: DeviceReport) -> dict[str, Any]:
    return {
        "object": "node.earnings",
        "device_id": report.device_id,
        "name": report.name,
        "account_id": report.account_id,
        "jobs_served": report.all_time.jobs,
        "today": _totals(report.today),
        "last_30_days": _totals(report.last_30_days),
        "all_time": _totals(report.all_time),
        "account": _funds(report.funds),
    }


def _payouts(gateway: Gateway) -> Payouts:
    return Payouts.from_settings(gateway.engine, gateway.settings)


def _live_only(principal: Principal) -> None:
    if principal.sandbox:
        raise Forbidden("Payouts move real money: use a live key (sg_live_…), not a test key.")


async def _decide(step: Awaitable[Payout]) -> Response:
    try:
        payout = await step
    except IllegalTransition as exc:
        raise Conflict(str(exc), param="status") from exc
    return json_response(describe_payout(payout))


# -- provider routes ---------------------------------------------------------------------
@router.get("/v1/provider/earnings", summary="The calling provider's earnings", response_model=None)
async def provider_earnings(
    principal: CurrentPrincipal,
    gateway: GatewayDep,
    days: Annotated[int, Query(ge=1, le=MAX_REPORT_DAYS)] = 30,
) -> Response:
    await gateway.billing.writer.posted()  # include the jobs of the last few ms
    report = await provider_report(
        gateway.engine,
        principal.account_id,
        days=days,
        now=utcnow(),
        lock_days=gateway.settings.welcome_bonus_lock_days,
    )
    return json_response(describe_report(report, gateway.settings.payout_threshold_micros))


@router.post(
    "/v1/provider/payouts",
    status_code=201,
    summary="Request a payout of withdrawable earnings",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": PayoutRequestBody.model_json_schema()}},
        }
    },
    response_model=None,
)
async def request_payout(
    request: Request, principal: CurrentPrincipal, gateway: GatewayDep
) -> Response:
    _live_only(principal)
    body = parse_body(PayoutRequestBody, await read_body(request, _MAX_BODY))
    await gateway.billing.writer.posted()  # earnings of the last few ms are withdrawable
    payout = await _payouts(gateway).request(
        principal.account_id, body.micros(), destination=body.destination
    )
    return json_response(describe_payout(payout), status_code=201)


@router.get("/v1/provider/payouts", summary="The calling provider's payouts", response_model=None)
async def list_own_payouts(
    principal: CurrentPrincipal,
    gateway: GatewayDep,
    status: PayoutStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> Response:
    found = await _payouts(gateway).list_payouts(
        account_id=principal.account_id, status=status, limit=limit
    )
    return json_response({"object": "list", "data": [describe_payout(p) for p in found]})


@router.get("/v1/provider/payouts/{payout_id}", response_model=None)
async def get_own_payout(
    payout_id: str, principal: CurrentPrincipal, gateway: GatewayDep
) -> Response:
    payout = await _payouts(gateway).get(payout_id, owner=principal.account_id)
    return json_response(describe_payout(payout))


@router.post("/v1/provider/payouts/{payout_id}/cancel", response_model=None)
async def cancel_payout(
    payout_id: str, principal: CurrentPrincipal, gateway: GatewayDep
) -> Response:
    _live_only(principal)
    return await _decide(_payouts(gateway).cancel(principal.account_id, payout_id))


# -- a device's own view (device token) -------------------------------------------------
@router.get(
    "/v1/nodes/earnings",
    summary="This device's earnings and its account's withdrawable balance; for device tokens",
    response_model=None,
)
async def node_earnings(device: CurrentDevice, gateway: GatewayDep) -> Response:
    await gateway.billing.writer.posted()
    report = await device_report(
        gateway.engine,
        device_id=device.device_id,
        name=device.name,
        account_id=device.account_id,
        now=utcnow(),
        lock_days=gateway.settings.welcome_bonus_lock_days,
    )
    return json_response(describe_device_report(report))


# -- admin -------------------------------------------------------------------------------
async def _note(request: Request) -> str | None:
    raw = await read_body(request, _MAX_BODY)
    return parse_optional_body(PayoutDecisionBody, raw).note


@router.get("/admin/payouts", tags=["admin"], dependencies=[AdminDep], response_model=None)
async def admin_list_payouts(
    gateway: GatewayDep,
    status: PayoutStatus | None = None,
    account_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> Response:
    found = await _payouts(gateway).list_payouts(account_id=account_id, status=status, limit=limit)
    return json_response({"object": "list", "data": [describe_payout(p) for p in found]})


@router.post(
    "/admin/payouts/{payout_id}/approve",
    tags=["admin"],
    dependencies=[AdminDep],
    response_model=None,
)
async def admin_approve_payout(payout_id: str, request: Request, gateway: GatewayDep) -> Response:
    return await _decide(_payouts(gateway).approve(payout_id, await _note(request)))


@router.post(
    "/admin/payouts/{payout_id}/reject",
    tags=["admin"],
    dependencies=[AdminDep],
    response_model=None,
)
async def admin_reject_payout(payout_id: str, request: Request, gateway: GatewayDep) -> Response:
    return await _decide(_payouts(gateway).reject(payout_id, await _note(request)))


@router.post(
    "/admin/payouts/{payout_id}/paid", tags=["admin"], dependencies=[AdminDep], response_model=None
)
async def admin_mark_paid(payout_id: str, request: Request, gateway: GatewayDep) -> Response:
    return await _decide(_payouts(gateway).mark_paid(payout_id, await _note(request)))
