"""Adding credit: admin top-ups, Stripe Checkout, and Stripe's payment webhook.

Dollar amounts arrive as JSON strings (``"5.00"``) or numbers (``5.00``); both are read
exactly as decimals, never through a float, and must name whole micro-dollars.
"""

from __future__ import annotations

import json
import logging
from decimal import Decimal, InvalidOperation
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import Response

from swarmgate.api.deps import AdminDep, CurrentPrincipal, GatewayDep, read_body
from swarmgate.api.responses import json_response
from swarmgate.billing.pricing import MAX_AMOUNT_MICROS
from swarmgate.billing.stripe_payments import (
    STRIPE_SOURCE,
    StripePayments,
    Unfulfillable,
    checkout_credit,
)
from swarmgate.errors import NotFound, RequestError

log = logging.getLogger("swarmgate.billing")

ModelT = TypeVar("ModelT", bound=BaseModel)
MICROS_PER_USD = 1_000_000
# A dollar amount as sent: a decimal string, or a JSON number read as a Decimal.
UsdAmount = Decimal | int | str


def usd_to_micros(value: UsdAmount, *, param: str) -> int:
    """An exact dollar amount in micro-dollars; refuses fractions of a micro-dollar."""
    try:
        amount = Decimal(value.strip() if isinstance(value, str) else value)
    except InvalidOperation:
        raise RequestError(
            f"{param} is not an amount of dollars: {value!r}.", param=param
        ) from None
    if not amount.is_finite() or amount <= 0:
        raise RequestError(f"{param} must be a positive amount of dollars.", param=param)
    micros = amount * MICROS_PER_USD
    if micros != micros.to_integral_value():
        raise RequestError(f"{param} has more than 6 decimal places.", param=param)
    if micros > MAX_AMOUNT_MICROS:
        raise RequestError(f"{param} is too large.", param=param)
    return int(micros)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def parse_exact_body(model: type[ModelT], body: bytes) -> ModelT:
    """Like ``parse_body``, but JSON numbers with a fraction are read as Decimal."""
    if not body.strip():
        raise RequestError("The request body is empty; send a JSON object.")
    try:
        raw = json.loads(body, parse_float=Decimal, parse_constant=_reject_constant)
    except ValueError as exc:  # JSONDecodeError, bad UTF-8, NaN / Infinity
        raise RequestError(f"Malformed JSON body: {exc}.") from None
    if not isinstance(raw, dict):
        raise RequestError("The request body must be a JSON object.")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        # These bodies are flat: the first part of the location is the field (after it
        # come list indexes and the names pydantic gives union members).
        param = str(first["loc"][0]) if first["loc"] else None
        if first["type"] == "missing":
            raise RequestError(f"Missing required parameter: '{param}'.", param=param) from None
        if first["type"] == "is_instance_of" and "Decimal" in first["msg"]:
            raise RequestError(
                f"'{param}' must be an amount of dollars: a string such as \"5.00\" or a number.",
                param=param,
            ) from None
        message = f"Invalid value for '{param}': {first['msg']}." if param else first["msg"]
        raise RequestError(message, param=param) from None


class TopUpRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    amount_usd: UsdAmount | None = None
    amount_micros: int | None = Field(default=None, ge=1, le=MAX_AMOUNT_MICROS)
    sandbox: bool = False
    memo: str | None = Field(default=None, max_length=500)
    # A caller's own id for this grant: the same id credits once.
    external_id: str | None = Field(default=None, min_length=1, max_length=200)

    def micros(self) -> int:
        if (self.amount_usd is None) == (self.amount_micros is None):
            raise RequestError(
                "Send exactly one of 'amount_usd' or 'amount_micros'.", param="amount_usd"
            )
        if self.amount_micros is not None:
            return self.amount_micros
        assert self.amount_usd is not None
        return usd_to_micros(self.amount_usd, param="amount_usd")


class CheckoutRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    amount_usd: UsdAmount


router = APIRouter(tags=["billing"])
admin = APIRouter(prefix="/admin", tags=["admin"], dependencies=[AdminDep])


@admin.post("/accounts/{account_id}/top-up", response_model=None)
async def top_up(account_id: str, request: Request, gateway: GatewayDep) -> Response:
    body = parse_exact_body(TopUpRequest, await read_body(request, gateway.settings.max_body_bytes))
    amount = body.micros()
    transaction_id = await gateway.billing.top_up(
        account_id,
        amount,
        source="admin",
        external_id=body.external_id,
        sandbox=body.sandbox,
        memo=body.memo,
    )
    balance = await gateway.billing.balance(account_id, sandbox=body.sandbox)
    return json_response(
        {
            "object": "top_up",
            "account_id": account_id,
            "transaction_id": transaction_id,
            "amount_micros": amount,
            "sandbox": body.sandbox,
            "available_micros": balance.available_micros,
            "held_micros": balance.held_micros,
        }
    )


@router.post("/v1/billing/checkout", summary="Buy credit with Stripe Checkout", response_model=None)
async def create_checkout(
    request: Request, principal: CurrentPrincipal, gateway: GatewayDep
) -> Response:
    body = parse_exact_body(
        CheckoutRequest, await read_body(request, gateway.settings.max_body_bytes)
    )
    amount = usd_to_micros(body.amount_usd, param="amount_usd")
    session = await StripePayments(gateway.settings).create_checkout(principal.account_id, amount)
    return json_response(
        {
            "object": "checkout.session",
            "id": session.id,
            "url": session.url,
            "amount_micros": amount,
        }
    )


@router.post(
    "/v1/billing/stripe/webhook",
    summary="Stripe's payment events (signed with Stripe-Signature)",
    response_model=None,
)
async def stripe_webhook(request: Request, gateway: GatewayDep) -> Response:
    payments = StripePayments(gateway.settings)
    # The signature covers the body byte for byte: it is checked before any parsing.
    payload = await read_body(request, gateway.settings.max_body_bytes)
    event = payments.verify_event(payload, request.headers.get("stripe-signature"))
    context = {"stripe_event_id": event.id, "stripe_event_type": event.type}
    try:
        session = event.data.object.to_dict()
    except AttributeError:  # an event without data.object carries no payment
        session = {}
    try:
        credit = checkout_credit(event.type, session)
    except Unfulfillable as exc:
        log.error("a paid Stripe session cannot be credited: %s", exc, extra=context)
        return json_response({"received": True, "credited": False, "reason": str(exc)})
    if credit is None:
        return json_response({"received": True, "credited": False})
    try:
        transaction_id = await gateway.billing.top_up(
            credit.account_id,
            credit.amount_micros,
            source=STRIPE_SOURCE,
            external_id=credit.session_id,
            memo=f"Stripe Checkout {credit.session_id} (event {event.id})",
        )
    except NotFound:
        log.error(
            "a paid Stripe session names an unknown account",
            extra={**context, "account_id": credit.account_id, "session_id": credit.session_id},
        )
        return json_response({"received": True, "credited": False, "reason": "unknown account"})
    return json_response(
        {
            "received": True,
            "credited": True,
            "account_id": credit.account_id,
            "amount_micros": credit.amount_micros,
            "transaction_id": transaction_id,
        }
    )


router.include_router(admin)
