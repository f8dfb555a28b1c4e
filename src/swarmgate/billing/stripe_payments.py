"""Stripe top-ups: Checkout Sessions out, signed ``checkout.session.completed`` events in.

A developer buys credit in three steps:

1. ``POST /v1/billing/checkout`` creates a Checkout Session for a dollar amount, with
   the account id as ``client_reference_id`` (and in ``metadata.account_id``), and
   answers with the session's hosted payment page URL;
2. the developer pays on Stripe's page;
3. Stripe posts ``checkout.session.completed`` to ``/v1/billing/stripe/webhook``; once
   the signature checks out and the session is paid, ``amount_total`` cents become
   ``amount_total * 10_000`` micro-dollars of credit through ``Billing.top_up``.

Payment methods that settle later (bank debits) complete the session unpaid and then
send ``checkout.session.async_payment_succeeded``; that event credits as well.

**Exactly once.** The ledger's idempotency key is the Checkout Session id
(``source="stripe"``, ``external_id=cs_…``), not the event id: one session is one
payment, however many events Stripe (or an operator pressing "resend") delivers about
it, so a replayed or duplicated event answers 200 and credits nothing more. This is
what Stripe's fulfilment guide asks for as well.

**What is acknowledged without credit** (200, logged): events of other types, sessions
not paid yet, sessions in a currency other than USD, and sessions whose account does
not exist (deleted since, or a session made outside Swarmgate). Stripe retries any
non-2xx answer for days, and no retry can make those credit correctly; the log line
carries the event and session ids so an operator can credit by hand with
``swarmgate admin accounts top-up``. A session whose id was already credited with a
different amount or account is refused with 400: that is not a retry but a ledger
inconsistency, and it should stay visible as a failing delivery in Stripe's dashboard.

Stripe's test mode (``livemode: false``) is not mapped to sandbox credit: which Stripe
keys a gateway runs with is its operator's decision.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import stripe

from swarmgate.config import GatewaySettings
from swarmgate.errors import PaymentProviderError, PaymentsNotConfigured, RequestError

log = logging.getLogger("swarmgate.billing.stripe")

MICROS_PER_CENT = 10_000
MIN_CHECKOUT_MICROS = 1_000_000  # $1
MAX_CHECKOUT_MICROS = 10_000_000_000  # $10,000
STRIPE_SOURCE = "stripe"
# The events that can carry a paid Checkout Session.
CREDIT_EVENTS = frozenset(
    {"checkout.session.completed", "checkout.session.async_payment_succeeded"}
)
_STRIPE_TIMEOUT_S = 30.0
_STRIPE_RETRIES = 2  # the library adds an Idempotency-Key to retried POSTs


@dataclass(frozen=True, slots=True)
class CheckoutSession:
    id: str
    url: str


@dataclass(frozen=True, slots=True)
class StripeCredit:
    """What a paid Checkout Session is worth, and to whom."""

    account_id: str
    amount_micros: int
    session_id: str


# -- pure rules ----------------------------------------------------------------------
def checkout_cents(amount_micros: int) -> int:
    """The Checkout line item in cents; refuses amounts off the whole cent or out of range."""
    if not MIN_CHECKOUT_MICROS <= amount_micros <= MAX_CHECKOUT_MICROS:
        raise RequestError(
            "amount_usd must be between 1.00 and 10000.00 dollars.", param="amount_usd"
        )
    cents, rest = divmod(amount_micros, MICROS_PER_CENT)
    if rest:
        raise RequestError("amount_usd must be a whole number of cents.", param="amount_usd")
    return cents


def checkout_params(
    account_id: str, amount_micros: int, *, success_url: str, cancel_url: str
) -> dict[str, Any]:
    return {
        "mode": "payment",
        "line_items": [
            {
                "quantity": 1,
                "price_data": {
                    "currency": "usd",
                    "unit_amount": checkout_cents(amount_micros),
                    "product_data": {"name": "Swarmgate credits"},
                },
            }
        ],
        "client_reference_id": account_id,
        "metadata": {"account_id": account_id},
        "success_url": success_url,
        "cancel_url": cancel_url,
    }


class Unfulfillable(Exception):
    """A paid-looking event that cannot become credit; acknowledged and logged."""


def checkout_credit(event_type: str, session: Mapping[str, Any]) -> StripeCredit | None:
    """The credit a Checkout event is worth: None when there is nothing to credit (yet).

    Raises Unfulfillable for a paid session that can never be credited correctly.
    """
    if event_type not in CREDIT_EVENTS or session.get("payment_status") != "paid":
        return None
    session_id = session.get("id")
    if not isinstance(session_id, str) or not session_id:
        raise Unfulfillable("the session has no id")
    metadata = session.get("metadata")
    account_id = session.get("client_reference_id") or (
        metadata.get("account_id") if isinstance(metadata, Mapping) else None
    )
    if not isinstance(account_id, str) or not account_id:
        raise Unfulfillable("the session names no account")
    if str(session.get("currency", "")).lower() != "usd":
        raise Unfulfillable(f"the session was paid in {session.get('currency')!r}, not usd")
    cents = session.get("amount_total")
    # bool is an int subclass, and a float here would be a malformed event.
    if not isinstance(cents, int) or isinstance(cents, bool) or cents <= 0:
        raise Unfulfillable(f"the session's amount_total is {cents!r}")
    return StripeCredit(account_id, cents * MICROS_PER_CENT, session_id)


# -- IO: the Stripe library --------------------------------------------------------------
class _HttpxTransport(stripe.HTTPClient):
    """The Stripe library's async HTTP seam over one httpx client.

    The library's own httpx adapter uploads the form body as ``data=<str>``, which
    httpx deprecates; this one sends it as ``content=``.
    """

    name = "swarmgate-httpx"

    def __init__(self, timeout_s: float) -> None:
        super().__init__()
        self._client = httpx.AsyncClient(timeout=timeout_s, trust_env=False)

    async def request_async(
        self, method: str, url: str, headers: Mapping[str, str], post_data: Any = None
    ) -> tuple[bytes, int, Mapping[str, str]]:
        try:
            response = await self._client.request(
                method, url, headers=headers, content=post_data or None
            )
        except httpx.HTTPError as exc:
            # The library retries only its own connection error.
            raise stripe.APIConnectionError(  # type: ignore[no-untyped-call]
                f"could not reach Stripe: {type(exc).__name__}", should_retry=True
            ) from exc
        return response.content, response.status_code, response.headers

    def sleep_async(self, secs: float) -> Any:
        return asyncio.sleep(secs)

    async def close_async(self) -> None:
        await self._client.aclose()

    def close(self) -> None:
        # Only the async path is used; there is no synchronous client to close.
        return None


class StripePayments:
    """Creates Checkout Sessions and verifies Stripe's webhook events."""

    def __init__(self, settings: GatewaySettings) -> None:
        self._settings = settings

    async def create_checkout(self, account_id: str, amount_micros: int) -> CheckoutSession:
        settings = self._settings
        if not settings.stripe_secret_key:
            raise PaymentsNotConfigured(
                "Payments are not configured on this gateway: set SWARMGATE_STRIPE_SECRET_KEY."
            )
        params = checkout_params(
            account_id,
            amount_micros,
            success_url=settings.checkout_success_url,
            cancel_url=settings.checkout_cancel_url,
        )
        transport = _HttpxTransport(_STRIPE_TIMEOUT_S)
        base = settings.stripe_api_base.rstrip("/")
        client = stripe.StripeClient(
            settings.stripe_secret_key,
            base_addresses={"api": base} if base else None,
            http_client=transport,
            max_network_retries=_STRIPE_RETRIES,
        )
        try:
            session = await client.v1.checkout.sessions.create_async(params=params)  # type: ignore[arg-type]
        except (stripe.AuthenticationError, stripe.PermissionError) as exc:
            # The operator's key is wrong: nothing the developer can fix, so no detail.
            log.error("Stripe refused the gateway's secret key", extra={"error": str(exc)})
            raise PaymentProviderError(
                "Payments are misconfigured on this gateway; try again later."
            ) from exc
        except stripe.StripeError as exc:
            detail = exc.user_message or "no detail"
            raise PaymentProviderError(f"Stripe refused the checkout: {detail}") from exc
        finally:
            await transport.close_async()
        if not session.id or not session.url:
            raise PaymentProviderError("Stripe answered without a checkout session id or URL.")
        return CheckoutSession(session.id, session.url)

    def verify_event(self, payload: bytes, signature: str | None) -> stripe.Event:
        """The event in ``payload`` once ``Stripe-Signature`` proves Stripe sent it, recently."""
        secret = self._settings.stripe_webhook_secret
        if not secret:
            raise PaymentsNotConfigured(
                "Stripe webhooks are not configured on this gateway: "
                "set SWARMGATE_STRIPE_WEBHOOK_SECRET."
            )
        if not signature:
            raise RequestError(
                "Missing Stripe-Signature header.",
                param="Stripe-Signature",
                code="INVALID_SIGNATURE",
            )
        try:
            event: stripe.Event = stripe.Webhook.construct_event(payload, signature, secret)
        except stripe.SignatureVerificationError as exc:
            raise RequestError(
                f"Invalid Stripe-Signature: {exc.user_message or 'verification failed'}",
                param="Stripe-Signature",
                code="INVALID_SIGNATURE",
            ) from None
        except ValueError:  # a signed body that is not JSON
            raise RequestError("The Stripe event is not valid JSON.") from None
        return event
