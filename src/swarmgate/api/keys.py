"""``/v1/keys``: a caller manages its own account's API keys.

Any authenticated caller (an API key, a session or a JWT) acts on its own account
only; another account's key is "not found". A ``sg_test_`` key may manage test keys
only, so a leaked sandbox key cannot mint a key that spends real money.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from swarmgate.accounts import service
from swarmgate.accounts.keys import KeyMode, KeySettings, Principal, utcnow
from swarmgate.api.deps import CurrentPrincipal, GatewayDep, read_body
from swarmgate.api.responses import json_response
from swarmgate.api.schemas import body_schema, parse_body, parse_optional_body
from swarmgate.billing.pricing import MAX_AMOUNT_MICROS
from swarmgate.errors import Forbidden, RequestError
from swarmgate.gateway import Gateway

router = APIRouter(tags=["keys"])

MICROS_PER_USD = 1_000_000
MAX_GRACE_SECONDS = 7 * 86_400
MAX_EXPIRES_IN_DAYS = 3_650

_STRICT = ConfigDict(extra="forbid", strict=True)
ModelId = Annotated[str, Field(min_length=1, max_length=200)]


def usd_to_micros(amount: Decimal, param: str = "daily_spend_cap_usd") -> int:
    """Dollars as a Decimal to integer micro-dollars, exactly: no float takes part, and
    an amount finer than one micro-dollar is refused rather than rounded."""
    if not amount.is_finite():
        raise RequestError(f"'{param}' must be a finite amount of dollars.", param=param)
    if amount < 0 or amount > Decimal(MAX_AMOUNT_MICROS) / MICROS_PER_USD:
        raise RequestError(
            f"'{param}' must be between 0 and {MAX_AMOUNT_MICROS // MICROS_PER_USD} dollars.",
            param=param,
        )
    micros = amount * MICROS_PER_USD
    if micros != micros.to_integral_value():
        raise RequestError(f"'{param}' has more than 6 decimal places.", param=param)
    return int(micros)


class _KeyFields(BaseModel):
    model_config = _STRICT

    name: str = Field(default="", max_length=200)
    expires_at: datetime | None = None
    expires_in_days: int | None = Field(default=None, ge=1, le=MAX_EXPIRES_IN_DAYS)
    rpm_limit: int | None = Field(default=None, ge=1, le=10_000_000)
    tpm_limit: int | None = Field(default=None, ge=1, le=10_000_000_000)
    # Dollars as a JSON string ("2.50") or number; parsed as a Decimal, never a float.
    daily_spend_cap_usd: Decimal | None = Field(default=None, strict=False)
    daily_spend_cap_micros: int | None = Field(default=None, ge=0, le=MAX_AMOUNT_MICROS)
    allowed_models: list[ModelId] | None = Field(default=None, max_length=1_000)
    auto_memory: bool = False
    auto_orchestration: bool = False

    def expiry(self, now: datetime) -> datetime | None:
        if self.expires_at is not None and self.expires_in_days is not None:
            raise RequestError(
                "Give 'expires_at' or 'expires_in_days', not both.", param="expires_at"
            )
        if self.expires_in_days is not None:
            return now + timedelta(days=self.expires_in_days)
        if self.expires_at is None:
            return None
        # A time without a zone is taken as UTC, as everything stored is.
        expires_at = self.expires_at
        if expires_at.tzinfo is None:
            expires_at = expires_at.replace(tzinfo=UTC)
        if expires_at <= now:
            raise RequestError("'expires_at' must be in the future.", param="expires_at")
        return expires_at.astimezone(UTC)

    def spend_cap_micros(self) -> int | None:
        if self.daily_spend_cap_usd is not None and self.daily_spend_cap_micros is not None:
            raise RequestError(
                "Give 'daily_spend_cap_usd' or 'daily_spend_cap_micros', not both.",
                param="daily_spend_cap_usd",
            )
        if self.daily_spend_cap_usd is not None:
            return usd_to_micros(self.daily_spend_cap_usd)
        return self.daily_spend_cap_micros


class NewKey(_KeyFields):
    mode: Literal["live", "test"] = "live"


class KeyChanges(_KeyFields):
    """Only the fields present change; ``null`` clears a limit (or the expiry)."""


class Rotate(BaseModel):
    model_config = _STRICT

    grace_seconds: int = Field(default=0, ge=0, le=MAX_GRACE_SECONDS)


def _check_models(gateway: Gateway, models: list[str] | None) -> None:
    for index, model_id in enumerate(models or []):
        if gateway.catalog.get(model_id) is None:
            raise RequestError(
                f"The model {model_id!r} does not exist; see GET /v1/models.",
                param=f"allowed_models[{index}]",
                code="MODEL_NOT_FOUND",
            )


def _may_manage(principal: Principal, mode: KeyMode) -> None:
    if principal.sandbox and mode != "test":
        raise Forbidden(
            "A test key can only manage test keys; use a live key or a session.", param="mode"
        )


async def _owned_key(gateway: Gateway, principal: Principal, key_id: str) -> dict[str, Any]:
    key = await service.get_api_key(gateway.engine, principal.account_id, key_id)
    _may_manage(principal, key["mode"])
    return key


@router.post(
    "/v1/keys",
    status_code=201,
    summary="Create an API key (the secret is shown once)",
    openapi_extra=body_schema(NewKey, required=False),
    response_model=None,
)
async def create_key(
    request: Request, principal: CurrentPrincipal, gateway: GatewayDep
) -> Response:
    raw = await read_body(request, gateway.settings.max_body_bytes)
    body = parse_optional_body(NewKey, raw)
    _may_manage(principal, body.mode)
    _check_models(gateway, body.allowed_models)
    settings = KeySettings(
        rpm_limit=body.rpm_limit,
        tpm_limit=body.tpm_limit,
        daily_spend_cap_micros=body.spend_cap_micros(),
        allowed_models=None if body.allowed_models is None else frozenset(body.allowed_models),
        auto_memory=body.auto_memory,
        auto_orchestration=body.auto_orchestration,
    )
    created = await service.create_api_key(
        gateway.engine,
        account_id=principal.account_id,
        name=body.name,
        mode=body.mode,
        expires_at=body.expiry(utcnow()),
        settings=settings,
    )
    key = await service.get_api_key(gateway.engine, principal.account_id, created.id)
    return json_response({**key, "key": created.secret}, status_code=201)


@router.get("/v1/keys", summary="List this account's API keys", response_model=None)
async def list_keys(principal: CurrentPrincipal, gateway: GatewayDep) -> Response:
    keys = await service.list_api_keys(gateway.engine, principal.account_id)
    return json_response({"object": "list", "data": keys})


@router.get("/v1/keys/{key_id}", summary="Get one API key", response_model=None)
async def get_key(key_id: str, principal: CurrentPrincipal, gateway: GatewayDep) -> Response:
    return json_response(await service.get_api_key(gateway.engine, principal.account_id, key_id))


@router.patch(
    "/v1/keys/{key_id}",
    summary="Change an API key's name, expiry or settings",
    openapi_extra=body_schema(KeyChanges),
    response_model=None,
)
async def update_key(
    key_id: str, request: Request, principal: CurrentPrincipal, gateway: GatewayDep
) -> Response:
    body = parse_body(KeyChanges, await read_body(request, gateway.settings.max_body_bytes))
    await _owned_key(gateway, principal, key_id)
    given = body.model_fields_set
    changes: dict[str, Any] = {}
    for field in ("name", "rpm_limit", "tpm_limit", "auto_memory", "auto_orchestration"):
        if field in given:
            changes[field] = getattr(body, field)
    if given & {"expires_at", "expires_in_days"}:
        changes["expires_at"] = body.expiry(utcnow())
    if given & {"daily_spend_cap_usd", "daily_spend_cap_micros"}:
        changes["daily_spend_cap_micros"] = body.spend_cap_micros()
    if "allowed_models" in given:
        _check_models(gateway, body.allowed_models)
        changes["allowed_models"] = body.allowed_models
    key = await service.update_api_key(gateway.engine, principal.account_id, key_id, changes)
    # The verifier caches keys; drop this one so the new settings apply to the next request.
    gateway.verifier.forget_key(key_id)
    return json_response(key)


@router.post(
    "/v1/keys/{key_id}/rotate",
    status_code=201,
    summary="Replace an API key with a new secret, same name and settings",
    openapi_extra=body_schema(Rotate, required=False),
    response_model=None,
)
async def rotate_key(
    key_id: str, request: Request, principal: CurrentPrincipal, gateway: GatewayDep
) -> Response:
    raw = await read_body(request, gateway.settings.max_body_bytes)
    body = parse_optional_body(Rotate, raw)
    await _owned_key(gateway, principal, key_id)
    rotation = await service.rotate_api_key(
        gateway.engine, principal.account_id, key_id, grace_s=body.grace_seconds
    )
    gateway.verifier.forget_key(key_id)
    return json_response(
        {**rotation.new_key, "key": rotation.created.secret, "replaced": rotation.old_key},
        status_code=201,
    )


@router.delete("/v1/keys/{key_id}", summary="Revoke an API key", response_model=None)
async def revoke_key(key_id: str, principal: CurrentPrincipal, gateway: GatewayDep) -> Response:
    await _owned_key(gateway, principal, key_id)
    key = await service.revoke_api_key(gateway.engine, principal.account_id, key_id)
    gateway.verifier.forget_key(key_id)
    return json_response(key)
