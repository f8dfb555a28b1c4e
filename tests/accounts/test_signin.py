"""Sign-up, sign-in, sessions and ``GET /v1/account`` over a real gateway."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from swarmgate.billing.ledger import Ledger
from tests.conftest import LiveGateway, fast_settings, start_gateway, stop_gateway

PASSWORD = "correct horse battery"


async def signup(live: LiveGateway, **body: Any) -> dict[str, Any]:
    payload = {"email": "alice@example.com", "password": PASSWORD, **body}
    async with live.client() as client:
        response = await client.post("/v1/auth/signup", json=payload)
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


async def test_signup_gives_a_working_key_a_session_and_welcome_credit(live: LiveGateway) -> None:
    created = await signup(live, email="  Alice@Example.COM ", name="Alice")
    account = created["account"]
    assert account["email"] == "alice@example.com"
    assert account["name"] == "Alice"
    assert account["roles"] == ["developer"]
    assert account["id"].startswith("acct_")
    key = created["api_key"]
    assert key["key"].startswith("sg_live_") and key["mode"] == "live"
    assert key["prefix"] == key["key"][: len(key["prefix"])]
    assert created["session"]["token"].startswith("sg_sess_")

    async with live.client(key["key"]) as client:
        assert (await client.get("/v1/models")).status_code == 200
        me = await client.get("/v1/account")
    assert me.status_code == 200
    assert me.json() == account
    async with live.client(created["session"]["token"]) as client:
        assert (await client.get("/v1/account")).json()["id"] == account["id"]
        listed = (await client.get("/v1/keys")).json()["data"]
    assert [k["id"] for k in listed] == [key["id"]]
    assert "key" not in listed[0] and "digest" not in listed[0]

    ledger = Ledger(live.gateway.engine)
    welcome = live.settings.welcome_credit_micros
    assert (await ledger.balance(account["id"])).available_micros == welcome
    assert (await ledger.balance(account["id"], sandbox=True)).available_micros == welcome


async def test_signup_roles(live: LiveGateway) -> None:
    created = await signup(live, email="p@example.com", roles=["provider", "developer"])
    assert created["account"]["roles"] == ["developer", "provider"]
    assert created["account"]["name"] == "p"  # the email's local part when no name is given


async def test_duplicate_email_is_409(live: LiveGateway) -> None:
    await signup(live)
    async with live.client() as client:
        again = await client.post(
            "/v1/auth/signup", json={"email": "ALICE@example.com", "password": "another-password"}
        )
    assert again.status_code == 409
    error = again.json()["error"]
    assert error["code"] == "EMAIL_TAKEN" and error["param"] == "email"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"password": PASSWORD}, "email"),
        ({"email": "bob@example.com"}, "password"),
        ({"email": "bob@example.com", "password": "short"}, "password"),
        ({"email": "bob@example.com", "password": 12345678}, "password"),
        ({"email": ["bob@example.com"], "password": PASSWORD}, "email"),
        ({"email": "not-an-email", "password": PASSWORD}, "email"),
        ({"email": "bob@example", "password": PASSWORD}, "email"),
        ({"email": "b ob@example.com", "password": PASSWORD}, "email"),
        ({"email": "bob@example.com", "password": PASSWORD, "roles": ["admin"]}, "roles[0]"),
        ({"email": "bob@example.com", "password": PASSWORD, "roles": []}, "roles"),
        ({"email": "bob@example.com", "password": PASSWORD, "name": ""}, "name"),
        ({"email": "bob@example.com", "password": PASSWORD, "is_admin": True}, "is_admin"),
    ],
)
async def test_bad_signup_bodies_are_400(
    live: LiveGateway, body: dict[str, Any], param: str
) -> None:
    async with live.client() as client:
        response = await client.post("/v1/auth/signup", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "INVALID_REQUEST"
    assert error["param"] == param


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b'"text"'])
async def test_signup_body_must_be_a_json_object(live: LiveGateway, raw: bytes) -> None:
    async with live.client() as client:
        response = await client.post(
            "/v1/auth/signup", content=raw, headers={"content-type": "application/json"}
        )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "INVALID_REQUEST"


async def test_signup_can_be_turned_off(tmp_path: Path) -> None:
    live = await start_gateway(fast_settings(tmp_path, signup_enabled=False))
    try:
        async with live.client() as client:
            response = await client.post(
                "/v1/auth/signup", json={"email": "a@example.com", "password": PASSWORD}
            )
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "SIGNUP_DISABLED"
    finally:
        await stop_gateway(live)


async def test_signin_and_the_same_401_for_a_wrong_password_or_email(live: LiveGateway) -> None:
    created = await signup(live)
    async with live.client() as client:
        ok = await client.post(
            "/v1/auth/signin", json={"email": " ALICE@example.com", "password": PASSWORD}
        )
        wrong_password = await client.post(
            "/v1/auth/signin", json={"email": "alice@example.com", "password": PASSWORD + "!"}
        )
        unknown_email = await client.post(
            "/v1/auth/signin", json={"email": "nobody@example.com", "password": PASSWORD}
        )
        not_an_email = await client.post(
            "/v1/auth/signin", json={"email": "nobody", "password": PASSWORD}
        )
        missing = await client.post("/v1/auth/signin", json={"email": "alice@example.com"})
    assert ok.status_code == 200
    session = ok.json()
    assert session["token"].startswith("sg_sess_")
    assert session["account_id"] == created["account"]["id"]
    assert session["token"] != created["session"]["token"]
    failures = [wrong_password, unknown_email, not_an_email]
    assert [r.status_code for r in failures] == [401, 401, 401]
    assert len({r.json()["error"]["message"] for r in failures}) == 1
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "password"
    async with live.client(session["token"]) as client:
        assert (await client.get("/v1/account")).json()["email"] == "alice@example.com"


async def test_accounts_without_a_password_cannot_sign_in(live: LiveGateway) -> None:
    from swarmgate.accounts import service

    await service.create_account(live.gateway.engine, name="admin-made", email="c@example.com")
    async with live.client() as client:
        response = await client.post(
            "/v1/auth/signin", json={"email": "c@example.com", "password": PASSWORD}
        )
    assert response.status_code == 401


async def test_signout_revokes_the_session_at_once(live: LiveGateway) -> None:
    created = await signup(live)
    token = created["session"]["token"]
    async with live.client(token) as client:
        assert (await client.get("/v1/account")).status_code == 200  # now cached
        out = await client.post("/v1/auth/signout")
        assert out.status_code == 200 and out.json()["revoked"] is True
        after = await client.get("/v1/account")
        assert after.status_code == 401
        assert (await client.post("/v1/auth/signout")).status_code == 401
    async with live.client(created["api_key"]["key"]) as client:
        # An API key is not a session: it is revoked through /v1/keys instead.
        assert (await client.post("/v1/auth/signout")).status_code == 400
        assert (await client.get("/v1/account")).status_code == 200


async def test_expired_and_made_up_sessions_are_401(live: LiveGateway) -> None:
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import update

    from swarmgate.store.tables import sessions

    created = await signup(live)
    async with live.gateway.engine.begin() as conn:
        await conn.execute(
            update(sessions).values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    async with live.client(created["session"]["token"]) as client:
        assert (await client.get("/v1/account")).status_code == 401
    async with live.client("sg_sess_" + "x" * 43) as client:
        response = await client.get("/v1/account")
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


async def test_account_needs_a_caller(live: LiveGateway) -> None:
    async with live.client() as client:
        assert (await client.get("/v1/account")).status_code == 401
