"""Trust and prices over the API: providers' own prices, a device's trust and its
integrity attestation, and the admin's word on suspended or verified devices."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from starlette.responses import Response

from swarmgate.api.deps import AdminDep, CurrentDevice, CurrentPrincipal, GatewayDep, read_body
from swarmgate.api.responses import json_response
from swarmgate.api.schemas import parse_body, parse_optional_body
from swarmgate.catalog import Pricing
from swarmgate.errors import (
    AttestationFailed,
    AttestationUnavailable,
    Forbidden,
    NotFound,
    RequestError,
)
from swarmgate.gateway import Gateway
from swarmgate.routing.profile import DeviceProfile
from swarmgate.store.tables import devices
from swarmgate.trust.score import SUSPEND_AT

router = APIRouter(tags=["trust"])

_MAX_BODY = 65_536


class PriceBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    input_per_1m_micros: int = Field(ge=0)
    output_per_1m_micros: int = Field(ge=0)


class PricesBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    # model id → the device's price, or null for the catalog's again
    prices: dict[Annotated[str, Field(min_length=1, max_length=200)], PriceBody | None] = Field(
        max_length=64
    )


class AttestationBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    kind: str = Field(default="play_integrity", max_length=40)
    nonce: str = Field(min_length=16, max_length=500)
    token: str = Field(min_length=1, max_length=32_000)


class VerifyBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    verified: bool = True


def describe_trust(gateway: Gateway, profile: DeviceProfile) -> dict[str, Any]:
    connection = gateway.registry.get(profile.device_id)
    gateway.trust.rescore(profile)  # up to date, not as of the last save
    return {
        "device_id": profile.device_id,
        "trust_score": profile.trust,
        "trusted": profile.trust > 0.8,
        "verified": profile.verified,
        "verified_by": profile.verified_by,
        "suspended": profile.suspended_reason is not None,
        "suspended_reason": profile.suspended_reason,
        "suspicions": profile.suspicions,
        "suspend_at": SUSPEND_AT,
        "last_suspicion": profile.last_suspicion,
        "jobs_served": profile.jobs_served,
        "jobs_failed": profile.jobs_failed,
        "canaries_passed": profile.canaries_passed,
        "canaries_failed": profile.canaries_failed,
        "connected": connection is not None,
        "prices": {model: price.model_dump() for model, price in sorted(profile.prices.items())},
        "stats": {
            model: {
                "ttft_ms": None if stats.ttft_ms is None else round(stats.ttft_ms, 1),
                "tokens_per_s": None
                if stats.tokens_per_s is None
                else round(stats.tokens_per_s, 1),
                "success_rate": round(stats.success, 4),
                "samples": stats.samples,
            }
            for model, stats in sorted(profile.stats.items())
        },
    }


async def _owned(gateway: Gateway, device_id: str, account_id: str) -> None:
    async with gateway.engine.connect() as conn:
        owner = (
            await conn.execute(select(devices.c.account_id).where(devices.c.id == device_id))
        ).scalar()
    if owner is None or owner != account_id:
        # Someone else's device looks the same as none: ids are not disclosed.
        raise NotFound(f"No device {device_id!r} on this account.")


# -- providers -------------------------------------------------------------------------------
@router.get(
    "/v1/provider/devices/{device_id}",
    summary="One of the caller's devices: trust, prices and observed speed",
    response_model=None,
)
async def provider_device(
    device_id: str, principal: CurrentPrincipal, gateway: GatewayDep
) -> Response:
    await _owned(gateway, device_id, principal.account_id)
    profile = await gateway.trust.known(device_id)
    low_high = {
        model: [bound.model_dump() for bound in gateway.trust.price_bounds(model)]
        for model in sorted(profile.stats)
    }
    return json_response({**describe_trust(gateway, profile), "price_bounds": low_high})


@router.put(
    "/v1/provider/devices/{device_id}/prices",
    summary="Set the device's own price per model, within the gateway's bounds",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": PricesBody.model_json_schema()}},
        }
    },
    response_model=None,
)
async def set_device_prices(
    device_id: str, request: Request, principal: CurrentPrincipal, gateway: GatewayDep
) -> Response:
    if principal.sandbox:
        raise Forbidden(
            "A test key cannot change a device's live prices.", code="LIVE_KEY_REQUIRED"
        )
    await _owned(gateway, device_id, principal.account_id)
    body = parse_body(PricesBody, await read_body(request, _MAX_BODY))
    await gateway.trust.set_prices(
        device_id,
        [
            (
                model,
                None
                if price is None
                else Pricing(
                    input_per_1m_micros=price.input_per_1m_micros,
                    output_per_1m_micros=price.output_per_1m_micros,
                ),
            )
            for model, price in body.prices.items()
        ],
    )
    connection = gateway.registry.get(device_id)
    if connection is not None:
        gateway.registry.repriced(connection)
    profile = await gateway.trust.known(device_id)
    return json_response(describe_trust(gateway, profile))


# -- a device's own view (device token) --------------------------------------------------------
@router.get("/v1/nodes/trust", summary="This device's trust score and record", response_model=None)
async def node_trust(device: CurrentDevice, gateway: GatewayDep) -> Response:
    profile = await gateway.trust.known(device.device_id)
    return json_response(describe_trust(gateway, profile))


@router.post(
    "/v1/nodes/attestation/nonce",
    summary="A single-use nonce for an integrity attestation request",
    response_model=None,
)
async def attestation_nonce(device: CurrentDevice, gateway: GatewayDep) -> Response:
    if gateway.attestation is None or gateway.nonces is None:
        raise AttestationUnavailable("This gateway does not verify device integrity.")
    nonce = gateway.nonces.issue(device.device_id)
    return json_response(
        {"nonce": nonce, "expires_in": int(gateway.nonces.ttl_s), "kind": gateway.attestation.kind}
    )


@router.post(
    "/v1/nodes/attestation",
    summary="Submit an integrity token for the nonce; a valid one makes the device verified",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": AttestationBody.model_json_schema()}},
        }
    },
    response_model=None,
)
async def submit_attestation(
    request: Request, device: CurrentDevice, gateway: GatewayDep
) -> Response:
    verifier, nonces = gateway.attestation, gateway.nonces
    if verifier is None or nonces is None:
        raise AttestationUnavailable("This gateway does not verify device integrity.")
    from swarmgate.trust.attestation import AttestationRejected

    body = parse_body(AttestationBody, await read_body(request, _MAX_BODY))
    if body.kind != verifier.kind:
        raise RequestError(
            f"This gateway verifies '{verifier.kind}' attestations, not '{body.kind}'.",
            param="kind",
        )
    try:
        nonces.consume(device.device_id, body.nonce)
        attestation = verifier.verify(body.token, device_id=device.device_id, nonce=body.nonce)
    except AttestationRejected as exc:
        raise AttestationFailed(
            f"The integrity attestation was rejected: {exc}",
            code=f"ATTESTATION_{exc.reason.upper()}",
        ) from exc
    profile = await gateway.trust.mark_verified(device.device_id, attestation.kind)
    return json_response(
        {**describe_trust(gateway, profile), "verdicts": list(attestation.verdicts)}
    )


# -- admin ---------------------------------------------------------------------------------------
@router.get(
    "/admin/devices/{device_id}/trust", tags=["admin"], dependencies=[AdminDep], response_model=None
)
async def admin_device_trust(device_id: str, gateway: GatewayDep) -> Response:
    profile = await gateway.trust.known(device_id)
    return json_response(describe_trust(gateway, profile))


@router.post(
    "/admin/devices/{device_id}/clear",
    tags=["admin"],
    dependencies=[AdminDep],
    summary="Forgive a device's suspicions and route to it again",
    response_model=None,
)
async def admin_clear_device(device_id: str, gateway: GatewayDep) -> Response:
    profile = await gateway.trust.clear(device_id)
    return json_response(describe_trust(gateway, profile))


@router.post(
    "/admin/devices/{device_id}/verify",
    tags=["admin"],
    dependencies=[AdminDep],
    summary="Mark a device verified (or not) by the admin's word",
    response_model=None,
)
async def admin_verify_device(device_id: str, request: Request, gateway: GatewayDep) -> Response:
    raw = await read_body(request, _MAX_BODY)
    body = parse_optional_body(VerifyBody, raw)
    profile = await gateway.trust.mark_verified(device_id, "admin", body.verified)
    return json_response(describe_trust(gateway, profile))
