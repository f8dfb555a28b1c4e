"""``/admin/*``: accounts, keys, device tokens, models and live devices; needs the admin token."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, Field
from starlette.responses import Response

from swarmgate.accounts import service
from swarmgate.api.deps import AdminDep, GatewayDep
from swarmgate.api.models import describe_model
from swarmgate.api.responses import json_response
from swarmgate.billing.pricing import MAX_AMOUNT_MICROS
from swarmgate.gateway import Gateway

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminDep])


class NewAccount(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    email: str | None = Field(default=None, max_length=320)
    credit_micros: int = Field(default=0, ge=0, le=MAX_AMOUNT_MICROS)
    developer: bool = True
    provider: bool = False


class NewKey(BaseModel):
    name: str = Field(default="", max_length=200)
    mode: Literal["live", "test"] = "live"
    expires_at: datetime | None = None


class NewDevice(BaseModel):
    account_id: str
    name: str = Field(default="", max_length=200)


@router.post("/accounts", status_code=201, response_model=None)
async def create_account(body: NewAccount, gateway: GatewayDep) -> Response:
    account = await service.create_account(
        gateway.engine,
        name=body.name,
        email=body.email,
        credit_micros=body.credit_micros,
        developer=body.developer,
        provider=body.provider,
    )
    return json_response(account, status_code=201)


@router.get("/accounts", response_model=None)
async def list_accounts(gateway: GatewayDep) -> Response:
    return json_response({"object": "list", "data": await service.list_accounts(gateway.engine)})


@router.post("/accounts/{account_id}/keys", status_code=201, response_model=None)
async def create_key(account_id: str, body: NewKey, gateway: GatewayDep) -> Response:
    created = await service.create_api_key(
        gateway.engine,
        account_id=account_id,
        name=body.name,
        mode=body.mode,
        expires_at=body.expires_at,
    )
    return json_response(
        {
            "id": created.id,
            "account_id": created.account_id,
            "key": created.secret,
            "prefix": created.prefix,
            "mode": body.mode,
            "created_at": created.created_at.isoformat(),
        },
        status_code=201,
    )


@router.post("/devices", status_code=201, response_model=None)
async def create_device(body: NewDevice, gateway: GatewayDep) -> Response:
    created = await service.create_device(
        gateway.engine,
        account_id=body.account_id,
        name=body.name,
        welcome_bonus_micros=gateway.settings.provider_welcome_bonus_micros,
    )
    return json_response(
        {
            "id": created.id,
            "account_id": created.account_id,
            "token": created.secret,
            "prefix": created.prefix,
            "created_at": created.created_at.isoformat(),
        },
        status_code=201,
    )


def live_devices(gateway: Gateway) -> list[dict[str, object]]:
    return [
        {
            "id": d.device_id,
            "account_id": d.account_id,
            "state": d.state.value,
            "pause_reason": d.pause_reason,
            "region": d.region,
            "slots": d.slots,
            "active_jobs": len(d.active),
            "models": sorted(d.models),
            "jobs_served": d.jobs_served,
            "trust_score": d.profile.trust,
            "verified": d.profile.verified,
            "suspended_reason": d.profile.suspended_reason,
            "stats": {
                model: {
                    "ttft_ms": stats.ttft_ms,
                    "tokens_per_s": stats.tokens_per_s,
                    "success_rate": round(stats.success, 4),
                    "samples": stats.samples,
                }
                for model, stats in d.profile.stats.items()
            },
            "node_version": d.node_version,
        }
        for d in gateway.registry.devices()
    ]


@router.get("/devices", response_model=None)
async def list_devices(gateway: GatewayDep) -> Response:
    registered = await service.list_devices(gateway.engine)
    live = {d["id"]: d for d in live_devices(gateway)}
    for device in registered:
        device["connection"] = live.get(device["id"])
    return json_response({"object": "list", "data": registered})


@router.get("/models", response_model=None)
async def list_models(gateway: GatewayDep) -> Response:
    data = [describe_model(gateway, m) for m in gateway.catalog]
    counts = gateway.registry.model_counts()
    for item in data:
        item["devices"] = counts.get(str(item["id"]), 0)
    return json_response({"object": "list", "data": data})
