"""Stripe top-ups: signed webhook events credit exactly once; Checkout against a local stand-in."""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import pytest

from swarmgate.billing.stripe_payments import StripeCredit, Unfulfillable, checkout_credit
from tests.conftest import LiveGateway, fast_settings, start_gateway, stop_gateway

WEBHOOK_SECRET = "whsec_test_0123456789abcdef"
SECRET_KEY = "sk_test_local_0123456789"


def sign(payload: bytes, secret: str = WEBHOOK_SECRET, timestamp: int | None = None) -> str:
    """Stripe's scheme: t=<unix>,v1=<hex HMAC-SHA256 of "t.payload">."""
    when = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{when}.".encode() + payload, hashlib.sha256)
    return f"t={when},v1={digest.hexdigest()}"


def session_event(
    account_id: str,
    *,
    event_id: str = "evt_1",
    event_type: str = "checkout.session.completed",
    session_id: str = "cs_test_1",
    cents: int = 1_234,
    payment_status: str = "paid",
    currency: str = "usd",
    use_metadata: bool = False,
) -> bytes:
    session: dict[str, Any] = {
        "id": session_id,
        "object": "checkout.session",
        "amount_total": cents,
        "currency": currency,
        "payment_status": payment_status,
        "mode": "payment",
        "client_reference_id": None if use_metadata else account_id,
        "metadata": {"account_id": account_id} if use_metadata else {},
    }
    return orjson.dumps(
        {
            "id": event_id,
            "object": "event",
            "api_version": "2026-01-28.clover",
            "created": int(time.time()),
            "livemode": False,
            "type": event_type,
            "data": {"object": session},
        }
    )


class StripeStandIn:
    """A local HTTP server answering like Stripe's API, recording each request."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.status = 200
        self.answer: dict[str, Any] = {
            "id": "cs_test_local",
            "object": "checkout.session",
            "url": "https://checkout.stripe.com/c/pay/cs_test_local",
        }
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                stand_in.requests.append(
                    {
                        "path": self.path,
                        "headers": {k.lower(): v for k, v in self.headers.items()},
                        "form": dict(urllib.parse.parse_qsl(body.decode())),
                    }
                )
                payload = orjson.dumps(stand_in.answer)
                self.send_response(stand_in.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stripe_api() -> Iterator[StripeStandIn]:
    server = StripeStandIn()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
async def paid(tmp_path: Path, stripe_api: StripeStandIn) -> AsyncIterator[LiveGateway]:
    settings = fast_settings(
        tmp_path,
        stripe_secret_key=SECRET_KEY,
        stripe_webhook_secret=WEBHOOK_SECRET,
        stripe_api_base=stripe_api.base_url,
        checkout_success_url="https://app.example.com/billing/done",
        checkout_cancel_url="https://app.example.com/billing",
    )
    live = await start_gateway(settings)
    try:
        yield live
    finally:
        await stop_gateway(live)


async def post_event(live: LiveGateway, payload: bytes, signature: str | None) -> Any:
    headers = {"Content-Type": "application/json"}
    if signature is not None:
        headers["Stripe-Signature"] = signature
    async with live.client() as client:
        return await client.post("/v1/billing/stripe/webhook", content=payload, headers=headers)


async def available(live: LiveGateway, account_id: str) -> int:
    return (await live.gateway.billing.balance(account_id)).available_micros


# -- the webhook -------------------------------------------------------------------------
async def test_a_paid_session_credits_its_account(paid: LiveGateway) -> None:
    account, _key = await paid.developer_key()
    payload = session_event(account, cents=1_234)
    response = await post_event(paid, payload, sign(payload))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["credited"] is True
    assert body["amount_micros"] == 12_340_000
    assert body["transaction_id"].startswith("txn_")
    assert await available(paid, account) == 5_000_000 + 12_340_000


async def test_a_replayed_event_credits_once(paid: LiveGateway) -> None:
    account, _key = await paid.developer_key()
    payload = session_event(account, cents=500)
    first = await post_event(paid, payload, sign(payload))
    replay = await post_event(paid, payload, sign(payload))
    assert first.status_code == replay.status_code == 200
    assert first.json()["transaction_id"] == replay.json()["transaction_id"]
    # Another event about the same paid session (a resend, an async success) changes nothing.
    other = session_event(
        account, event_id="evt_2", event_type="checkout.session.async_payment_succeeded", cents=500
    )
    third = await post_event(paid, other, sign(other))
    assert third.status_code == 200
    assert third.json()["transaction_id"] == first.json()["transaction_id"]
    assert await available(paid, account) == 5_000_000 + 5_000_000


async def test_account_from_metadata(paid: LiveGateway) -> None:
    account, _key = await paid.developer_key()
    payload = session_event(account, cents=100, use_metadata=True)
    response = await post_event(paid, payload, sign(payload))
    assert response.json()["credited"] is True
    assert await available(paid, account) == 6_000_000


@pytest.mark.parametrize(
    "signature",
    [
        None,
        "",
        "garbage",
        "t=123",
        "SIGNED_WITH_OTHER_SECRET",
        "STALE",
        "TAMPERED",
    ],
)
async def test_unverified_events_are_refused(paid: LiveGateway, signature: str | None) -> None:
    account, _key = await paid.developer_key()
    payload = session_event(account)
    sent = payload
    if signature == "SIGNED_WITH_OTHER_SECRET":
        signature = sign(payload, secret="whsec_someone_else")
    elif signature == "STALE":
        signature = sign(payload, timestamp=int(time.time()) - 600)  # tolerance is 300 s
    elif signature == "TAMPERED":
        signature = sign(payload)
        sent = payload.replace(b'"amount_total":1234', b'"amount_total":999999')
        assert sent != payload
    response = await post_event(paid, sent, signature)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "INVALID_SIGNATURE"
    assert error["param"] == "Stripe-Signature"
    assert await available(paid, account) == 5_000_000


async def test_a_signed_body_that_is_not_json(paid: LiveGateway) -> None:
    payload = b"not json"
    response = await post_event(paid, payload, sign(payload))
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "INVALID_REQUEST"


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"event_type": "customer.created"}, None),
        ({"event_type": "checkout.session.expired", "payment_status": "unpaid"}, None),
        ({"payment_status": "unpaid"}, None),
        ({"currency": "eur"}, "not usd"),
    ],
)
async def test_events_acknowledged_without_credit(
    paid: LiveGateway, overrides: dict[str, Any], reason: str | None
) -> None:
    account, _key = await paid.developer_key()
    payload = session_event(account, **overrides)
    response = await post_event(paid, payload, sign(payload))
    assert response.status_code == 200, response.text
    assert response.json()["credited"] is False
    if reason:
        assert reason in response.json()["reason"]
    assert await available(paid, account) == 5_000_000


async def test_an_unknown_account_is_acknowledged_and_logged(
    paid: LiveGateway, caplog: pytest.LogCaptureFixture
) -> None:
    payload = session_event("acct_gone", event_id="evt_orphan", session_id="cs_orphan")
    with caplog.at_level("ERROR", logger="swarmgate.billing"):
        response = await post_event(paid, payload, sign(payload))
    assert response.status_code == 200
    assert response.json() == {"received": True, "credited": False, "reason": "unknown account"}
    record = next(r for r in caplog.records if "unknown account" in r.getMessage())
    assert record.__dict__["stripe_event_id"] == "evt_orphan"
    assert record.__dict__["session_id"] == "cs_orphan"


async def test_webhook_without_a_secret_is_not_configured(live: LiveGateway) -> None:
    payload = session_event("acct_x")
    response = await post_event(live, payload, sign(payload))
    assert response.status_code == 503
    error = response.json()["error"]
    assert error["code"] == "PAYMENTS_NOT_CONFIGURED"
    assert "SWARMGATE_STRIPE_WEBHOOK_SECRET" in error["message"]


@pytest.mark.parametrize(
    ("event_type", "session", "expected"),
    [
        (
            "checkout.session.completed",
            {"id": "cs_1", "payment_status": "paid", "client_reference_id": "acct_1",
             "currency": "usd", "amount_total": 100},
            StripeCredit("acct_1", 1_000_000, "cs_1"),
        ),
        (
            "checkout.session.async_payment_succeeded",
            {"id": "cs_2", "payment_status": "paid", "metadata": {"account_id": "acct_2"},
             "currency": "USD", "amount_total": 1},
            StripeCredit("acct_2", 10_000, "cs_2"),
        ),
        ("checkout.session.completed", {"id": "cs_3", "payment_status": "unpaid"}, None),
        ("payment_intent.succeeded", {"id": "pi_1", "payment_status": "paid"}, None),
    ],
)  # fmt: skip
def test_checkout_credit(
    event_type: str, session: dict[str, Any], expected: StripeCredit | None
) -> None:
    assert checkout_credit(event_type, session) == expected


@pytest.mark.parametrize(
    "session",
    [
        {"payment_status": "paid", "client_reference_id": "a", "currency": "usd", "amount_total": 1},
        {"id": "cs", "payment_status": "paid", "currency": "usd", "amount_total": 1},
        {"id": "cs", "payment_status": "paid", "client_reference_id": "a", "amount_total": 1},
        {"id": "cs", "payment_status": "paid", "client_reference_id": "a", "currency": "usd"},
        {"id": "cs", "payment_status": "paid", "client_reference_id": "a", "currency": "usd",
         "amount_total": 1.5},
        {"id": "cs", "payment_status": "paid", "client_reference_id": "a", "currency": "usd",
         "amount_total": True},
        {"id": "cs", "payment_status": "paid", "client_reference_id": "a", "currency": "usd",
         "amount_total": 0},
    ],
)  # fmt: skip
def test_paid_sessions_that_cannot_be_credited(session: dict[str, Any]) -> None:
    with pytest.raises(Unfulfillable):
        checkout_credit("checkout.session.completed", session)


# -- Checkout ----------------------------------------------------------------------------
async def test_checkout_creates_a_stripe_session(
    paid: LiveGateway, stripe_api: StripeStandIn
) -> None:
    account, key = await paid.developer_key()
    async with paid.client(key) as client:
        response = await client.post("/v1/billing/checkout", json={"amount_usd": "25.00"})
    assert response.status_code == 200, response.text
    assert response.json() == {
        "object": "checkout.session",
        "id": "cs_test_local",
        "url": "https://checkout.stripe.com/c/pay/cs_test_local",
        "amount_micros": 25_000_000,
    }
    (request,) = stripe_api.requests
    assert request["path"] == "/v1/checkout/sessions"
    assert request["headers"]["authorization"] == f"Bearer {SECRET_KEY}"
    assert request["headers"]["content-type"] == "application/x-www-form-urlencoded"
    assert request["form"] == {
        "mode": "payment",
        "line_items[0][quantity]": "1",
        "line_items[0][price_data][currency]": "usd",
        "line_items[0][price_data][unit_amount]": "2500",
        "line_items[0][price_data][product_data][name]": "Swarmgate credits",
        "client_reference_id": account,
        "metadata[account_id]": account,
        "success_url": "https://app.example.com/billing/done",
        "cancel_url": "https://app.example.com/billing",
    }


@pytest.mark.parametrize(
    ("amount", "message"),
    [
        ("0.99", "between 1.00 and 10000.00"),
        ("10000.01", "between 1.00 and 10000.00"),
        ("5.001", "whole number of cents"),
        ("-5", "positive"),
        (True, "amount of dollars"),
    ],
)
async def test_checkout_amount_limits(
    paid: LiveGateway, stripe_api: StripeStandIn, amount: Any, message: str
) -> None:
    _account, key = await paid.developer_key()
    async with paid.client(key) as client:
        response = await client.post("/v1/billing/checkout", json={"amount_usd": amount})
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]
    assert response.json()["error"]["param"] == "amount_usd"
    assert stripe_api.requests == []


async def test_checkout_limits_are_inclusive(paid: LiveGateway, stripe_api: StripeStandIn) -> None:
    _account, key = await paid.developer_key()
    async with paid.client(key) as client:
        for amount in (1, "10000.00"):
            response = await client.post("/v1/billing/checkout", json={"amount_usd": amount})
            assert response.status_code == 200, response.text
    cents = [r["form"]["line_items[0][price_data][unit_amount]"] for r in stripe_api.requests]
    assert cents == ["100", "1000000"]


async def test_stripe_refusing_is_a_bad_gateway(
    paid: LiveGateway, stripe_api: StripeStandIn
) -> None:
    stripe_api.status = 400
    stripe_api.answer = {
        "error": {"type": "invalid_request_error", "message": "Invalid currency: usd."}
    }
    _account, key = await paid.developer_key()
    async with paid.client(key) as client:
        response = await client.post("/v1/billing/checkout", json={"amount_usd": "5"})
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "PAYMENT_PROVIDER_ERROR"
    assert "Invalid currency" in error["message"]
    assert SECRET_KEY not in response.text


async def test_a_wrong_secret_key_reveals_nothing(
    paid: LiveGateway, stripe_api: StripeStandIn
) -> None:
    stripe_api.status = 401
    stripe_api.answer = {
        "error": {
            "type": "invalid_request_error",
            "message": "Invalid API Key provided: sk_test_****6789",
        }
    }
    _account, key = await paid.developer_key()
    async with paid.client(key) as client:
        response = await client.post("/v1/billing/checkout", json={"amount_usd": "5"})
    assert response.status_code == 502
    assert "misconfigured" in response.json()["error"]["message"]
    assert "sk_test" not in response.text


async def test_checkout_needs_a_key_and_configuration(live: LiveGateway) -> None:
    async with live.client() as client:
        response = await client.post("/v1/billing/checkout", json={"amount_usd": "5"})
    assert response.status_code == 401
    _account, key = await live.developer_key()
    async with live.client(key) as client:
        response = await client.post("/v1/billing/checkout", json={"amount_usd": "5"})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "PAYMENTS_NOT_CONFIGURED"
