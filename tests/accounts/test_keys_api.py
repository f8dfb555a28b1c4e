"""``/v1/keys`` over a real gateway: create, list, get, change, rotate, revoke, expiry."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import update

from swarmgate.api.keys import usd_to_micros
from swarmgate.errors import RequestError
from swarmgate.store.tables import api_keys
from tests.conftest import MODEL, LiveGateway


async def new_key(live: LiveGateway, caller: str, **body: Any) -> dict[str, Any]:
    async with live.client(caller) as client:
        response = await client.post("/v1/keys", json=body)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def status_of(live: LiveGateway, secret: str) -> int:
    async with live.client(secret) as client:
        return (await client.get("/v1/models")).status_code


async def test_create_list_get_and_the_secret_shown_once(live: LiveGateway) -> None:
    _, caller = await live.developer_key()
    created = await new_key(
        live,
        caller,
        name="ci",
        rpm_limit=60,
        tpm_limit=100_000,
        daily_spend_cap_usd="2.50",
        allowed_models=[MODEL],
        auto_memory=True,
    )
    assert created["key"].startswith("sg_live_")
    assert created["object"] == "api_key" and created["name"] == "ci"
    assert created["status"] == "active" and created["expires_at"] is None
    assert created["settings"] == {
        "rpm_limit": 60,
        "tpm_limit": 100_000,
        "daily_spend_cap_micros": 2_500_000,
        "daily_spend_cap_usd": "2.500000",
        "allowed_models": [MODEL],
        "auto_memory": True,
        "auto_orchestration": False,
    }
    assert await status_of(live, created["key"]) == 200

    async with live.client(caller) as client:
        listed = (await client.get("/v1/keys")).json()
        one = (await client.get(f"/v1/keys/{created['id']}")).json()
    assert listed["object"] == "list" and len(listed["data"]) == 2
    assert created["id"] in {k["id"] for k in listed["data"]}
    for shown in [*listed["data"], one]:
        assert "key" not in shown and "digest" not in shown
    assert one == {k: v for k, v in created.items() if k != "key"}

    principal = await live.gateway.verifier.verify(created["key"])
    assert principal.settings.rpm_limit == 60
    assert principal.settings.daily_spend_cap_micros == 2_500_000
    assert principal.settings.allowed_models == frozenset({MODEL})
    assert principal.settings.auto_memory is True


async def test_defaults_and_an_empty_body(live: LiveGateway) -> None:
    _, caller = await live.developer_key()
    async with live.client(caller) as client:
        response = await client.post("/v1/keys")
    assert response.status_code == 201
    key = response.json()
    assert key["mode"] == "live" and key["name"] == ""
    assert key["settings"]["allowed_models"] is None and key["settings"]["rpm_limit"] is None


async def test_test_mode_keys(live: LiveGateway) -> None:
    _, caller = await live.developer_key()
    sandbox = await new_key(live, caller, mode="test", name="play")
    assert sandbox["key"].startswith("sg_test_") and sandbox["mode"] == "test"
    assert await status_of(live, sandbox["key"]) == 200
    # A sandbox key manages sandbox keys only: a leaked one cannot mint real-money keys.
    async with live.client(sandbox["key"]) as client:
        live_attempt = await client.post("/v1/keys", json={"mode": "live"})
        test_ok = await client.post("/v1/keys", json={"mode": "test"})
        live_keys = [
            k for k in (await client.get("/v1/keys")).json()["data"] if k["mode"] == "live"
        ]
        rotate_live = await client.post(f"/v1/keys/{live_keys[0]['id']}/rotate")
        revoke_live = await client.delete(f"/v1/keys/{live_keys[0]['id']}")
    assert live_attempt.status_code == 403
    assert test_ok.status_code == 201
    assert rotate_live.status_code == 403 and revoke_live.status_code == 403
    assert await status_of(live, caller) == 200


async def test_patch_changes_settings_at_once_and_null_clears(live: LiveGateway) -> None:
    _, caller = await live.developer_key()
    created = await new_key(live, caller, rpm_limit=10, daily_spend_cap_micros=1_000)
    secret = created["key"]
    before = await live.gateway.verifier.verify(secret)  # cached from here on
    assert before.settings.rpm_limit == 10

    async with live.client(caller) as client:
        patched = await client.patch(
            f"/v1/keys/{created['id']}",
            json={
                "name": "renamed",
                "rpm_limit": None,
                "tpm_limit": 500,
                "daily_spend_cap_usd": 0.1,
                "allowed_models": [MODEL],
                "auto_orchestration": True,
            },
        )
    assert patched.status_code == 200, patched.text
    settings = patched.json()["settings"]
    assert patched.json()["name"] == "renamed"
    assert settings["rpm_limit"] is None and settings["tpm_limit"] == 500
    assert settings["daily_spend_cap_micros"] == 100_000
    assert settings["allowed_models"] == [MODEL] and settings["auto_orchestration"] is True

    after = await live.gateway.verifier.verify(secret)
    assert after.settings.rpm_limit is None and after.settings.tpm_limit == 500
    assert after.settings.allowed_models == frozenset({MODEL})

    async with live.client(caller) as client:
        cleared = await client.patch(
            f"/v1/keys/{created['id']}",
            json={"allowed_models": None, "daily_spend_cap_micros": None},
        )
        untouched = await client.patch(f"/v1/keys/{created['id']}", json={})
    assert cleared.json()["settings"]["allowed_models"] is None
    assert cleared.json()["settings"]["daily_spend_cap_micros"] is None
    assert cleared.json()["settings"]["tpm_limit"] == 500  # absent fields stay as they were
    assert untouched.json() == cleared.json()
    assert (await live.gateway.verifier.verify(secret)).settings.allowed_models is None


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"rpm_limit": "10"}, "rpm_limit", "INVALID_REQUEST"),
        ({"rpm_limit": 0}, "rpm_limit", "INVALID_REQUEST"),
        ({"rpm_limit": 1.5}, "rpm_limit", "INVALID_REQUEST"),
        ({"auto_memory": "yes"}, "auto_memory", "INVALID_REQUEST"),
        ({"auto_memory": None}, "auto_memory", "INVALID_REQUEST"),
        ({"mode": "prod"}, "mode", "INVALID_REQUEST"),
        ({"name": 7}, "name", "INVALID_REQUEST"),
        ({"allowed_models": "all"}, "allowed_models", "INVALID_REQUEST"),
        ({"allowed_models": [MODEL, "no-such-model"]}, "allowed_models[1]", "MODEL_NOT_FOUND"),
        ({"daily_spend_cap_usd": "0.0000001"}, "daily_spend_cap_usd", "INVALID_REQUEST"),
        ({"daily_spend_cap_usd": "-1"}, "daily_spend_cap_usd", "INVALID_REQUEST"),
        ({"daily_spend_cap_usd": "lots"}, "daily_spend_cap_usd", "INVALID_REQUEST"),
        ({"daily_spend_cap_usd": True}, "daily_spend_cap_usd", "INVALID_REQUEST"),
        (
            {"daily_spend_cap_usd": "1", "daily_spend_cap_micros": 1},
            "daily_spend_cap_usd",
            "INVALID_REQUEST",
        ),
        ({"daily_spend_cap_micros": -1}, "daily_spend_cap_micros", "INVALID_REQUEST"),
        ({"expires_at": "2001-01-01T00:00:00Z"}, "expires_at", "INVALID_REQUEST"),
        ({"expires_at": "tomorrow"}, "expires_at", "INVALID_REQUEST"),
        ({"expires_in_days": 0}, "expires_in_days", "INVALID_REQUEST"),
        (
            {"expires_in_days": 1, "expires_at": "2999-01-01T00:00:00Z"},
            "expires_at",
            "INVALID_REQUEST",
        ),
        ({"secret": "mine"}, "secret", "INVALID_REQUEST"),
    ],
)
async def test_bad_key_bodies_are_400(
    live: LiveGateway, body: dict[str, Any], param: str, code: str
) -> None:
    _, caller = await live.developer_key()
    async with live.client(caller) as client:
        created = await client.post("/v1/keys", json=body)
        key_id = (await client.get("/v1/keys")).json()["data"][0]["id"]
        patched = await client.patch(f"/v1/keys/{key_id}", json=body)
    # A key's mode is fixed: a PATCH naming it is refused as an unknown field.
    for response in (created, patched):
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param
        assert response.json()["error"]["code"] == code
    assert (await live.gateway.verifier.verify(caller)).settings.rpm_limit is None


async def test_revoke_takes_effect_at_once(live: LiveGateway) -> None:
    _, caller = await live.developer_key()
    created = await new_key(live, caller, name="doomed")
    assert await status_of(live, created["key"]) == 200  # now cached by the verifier
    async with live.client(caller) as client:
        revoked = await client.delete(f"/v1/keys/{created['id']}")
        again = await client.delete(f"/v1/keys/{created['id']}")
        patch = await client.patch(f"/v1/keys/{created['id']}", json={"rpm_limit": 5})
        rotate = await client.post(f"/v1/keys/{created['id']}/rotate")
    assert revoked.status_code == 200
    assert revoked.json()["status"] == "revoked" and revoked.json()["revoked_at"] is not None
    assert again.json()["revoked_at"] == revoked.json()["revoked_at"]
    assert patch.status_code == 409 and patch.json()["error"]["code"] == "KEY_REVOKED"
    assert rotate.status_code == 409
    assert await status_of(live, created["key"]) == 401


async def test_a_key_can_revoke_itself(live: LiveGateway) -> None:
    _, caller = await live.developer_key()
    async with live.client(caller) as client:
        key_id = (await client.get("/v1/keys")).json()["data"][0]["id"]
        assert (await client.delete(f"/v1/keys/{key_id}")).status_code == 200
        assert (await client.get("/v1/keys")).status_code == 401


async def test_rotate_replaces_the_secret_and_keeps_name_and_settings(live: LiveGateway) -> None:
    _, caller = await live.developer_key()
    old = await new_key(
        live,
        caller,
        name="server",
        mode="live",
        tpm_limit=42,
        allowed_models=[MODEL],
        expires_in_days=30,
    )
    assert await status_of(live, old["key"]) == 200
    async with live.client(caller) as client:
        response = await client.post(f"/v1/keys/{old['id']}/rotate")
    assert response.status_code == 201, response.text
    new = response.json()
    assert new["id"] != old["id"] and new["key"] != old["key"]
    assert new["key"].startswith("sg_live_")
    assert new["name"] == "server" and new["settings"] == old["settings"]
    assert new["expires_at"] == old["expires_at"]
    assert new["replaced"]["id"] == old["id"] and new["replaced"]["status"] == "revoked"
    assert await status_of(live, old["key"]) == 401
    assert await status_of(live, new["key"]) == 200


async def test_rotate_with_a_grace_period(live: LiveGateway) -> None:
    _, caller = await live.developer_key()
    old = await new_key(live, caller, name="deploy")
    async with live.client(caller) as client:
        response = await client.post(f"/v1/keys/{old['id']}/rotate", json={"grace_seconds": 600})
        bad = await client.post(f"/v1/keys/{old['id']}/rotate", json={"grace_seconds": -1})
    assert response.status_code == 201
    replaced = response.json()["replaced"]
    assert replaced["status"] == "active" and replaced["revoked_at"] is None
    ends = datetime.fromisoformat(replaced["expires_at"])
    assert timedelta(seconds=590) < ends - datetime.now(UTC) <= timedelta(seconds=600)
    assert await status_of(live, old["key"]) == 200
    assert await status_of(live, response.json()["key"]) == 200
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "grace_seconds"


async def test_expired_keys_are_401(live: LiveGateway) -> None:
    _, caller = await live.developer_key()
    soon = datetime.now(UTC) + timedelta(seconds=1.5)
    short = await new_key(live, caller, expires_at=soon.isoformat())
    assert datetime.fromisoformat(short["expires_at"]) == soon
    await asyncio.sleep(1.6)
    assert await status_of(live, short["key"]) == 401

    used = await new_key(live, caller, expires_in_days=1)
    assert await status_of(live, used["key"]) == 200
    async with live.gateway.engine.begin() as conn:
        await conn.execute(
            update(api_keys)
            .where(api_keys.c.id == used["id"])
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    live.gateway.verifier.forget_key(used["id"])
    assert await status_of(live, used["key"]) == 401
    async with live.client(caller) as client:
        shown = (await client.get(f"/v1/keys/{used['id']}")).json()
        rotate = await client.post(f"/v1/keys/{used['id']}/rotate")
    assert shown["status"] == "expired"
    assert rotate.status_code == 409 and rotate.json()["error"]["code"] == "KEY_EXPIRED"


async def test_another_accounts_key_is_404(live: LiveGateway) -> None:
    _, mine = await live.developer_key("me")
    _, theirs = await live.developer_key("them")
    their_key = await new_key(live, theirs, name="private")
    key_id = their_key["id"]
    async with live.client(mine) as client:
        responses = [
            await client.get(f"/v1/keys/{key_id}"),
            await client.patch(f"/v1/keys/{key_id}", json={"rpm_limit": 1}),
            await client.post(f"/v1/keys/{key_id}/rotate"),
            await client.delete(f"/v1/keys/{key_id}"),
            await client.get("/v1/keys/key_doesnotexist"),
        ]
        listed = (await client.get("/v1/keys")).json()["data"]
    assert [r.status_code for r in responses] == [404] * 5
    assert responses[0].json()["error"]["code"] == "NOT_FOUND"
    assert key_id not in {k["id"] for k in listed}
    assert await status_of(live, their_key["key"]) == 200


async def test_keys_need_a_caller(live: LiveGateway) -> None:
    async with live.client() as client:
        assert (await client.get("/v1/keys")).status_code == 401
        assert (await client.post("/v1/keys", json={})).status_code == 401


@pytest.mark.parametrize(
    ("amount", "micros"),
    [
        ("0", 0),
        ("0.000001", 1),
        ("2.5", 2_500_000),
        ("2.50", 2_500_000),
        ("0.1", 100_000),
        ("19.99", 19_990_000),
        ("1e3", 1_000_000_000),
        ("1000000000", 10**15),
    ],
)
def test_usd_to_micros(amount: str, micros: int) -> None:
    assert usd_to_micros(Decimal(amount)) == micros


@pytest.mark.parametrize(
    "amount", ["0.0000001", "-0.01", "1000000000.000001", "NaN", "Infinity", "1e400"]
)
def test_usd_to_micros_refuses(amount: str) -> None:
    with pytest.raises(RequestError):
        usd_to_micros(Decimal(amount))


async def test_a_blank_body_is_not_an_empty_one(live: LiveGateway) -> None:
    """No body at all takes the defaults; a body that is only whitespace is not JSON."""
    _account, key = await live.developer_key()
    async with live.client(key) as client:
        blank = await client.post(
            "/v1/keys", content=b"\r\n", headers={"Content-Type": "application/json"}
        )
        assert blank.status_code == 400
        assert blank.json()["error"]["code"] == "INVALID_REQUEST"
        none = await client.post("/v1/keys")
        assert none.status_code == 201
