"""Admin top-ups: the API route, the CLI command and exact dollar parsing."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from swarmgate.api.billing import usd_to_micros
from swarmgate.errors import RequestError
from tests.conftest import ADMIN_TOKEN, LiveGateway, run_cli


async def top_up(live: LiveGateway, account_id: str, body: Any, token: str = ADMIN_TOKEN) -> Any:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    async with live.client(token) as client:
        return await client.post(
            f"/admin/accounts/{account_id}/top-up",
            content=content,
            headers={"Content-Type": "application/json"},
        )


@pytest.mark.parametrize(
    ("value", "micros"),
    [
        ("5.00", 5_000_000),
        ("0.000001", 1),
        (" 12.5 ", 12_500_000),
        ("1e3", 1_000_000_000),
        (Decimal("0.1"), 100_000),
        (7, 7_000_000),
        ("999999999", 999_999_999_000_000),
    ],
)
def test_dollars_parse_exactly(value: Any, micros: int) -> None:
    assert usd_to_micros(value, param="amount_usd") == micros


@pytest.mark.parametrize(
    "value",
    ["0", "-1", "0.0000001", "abc", "", "NaN", "Infinity", "1e400", Decimal("-0.5"), 0],
)
def test_dollars_refused(value: Any) -> None:
    with pytest.raises(RequestError) as caught:
        usd_to_micros(value, param="amount_usd")
    assert caught.value.param == "amount_usd"


async def test_admin_top_up_in_dollars(live: LiveGateway) -> None:
    account, _key = await live.developer_key()  # starts with $5
    response = await top_up(live, account, {"amount_usd": "2.50", "memo": "support credit"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "top_up"
    assert body["account_id"] == account
    assert body["transaction_id"].startswith("txn_")
    assert body["amount_micros"] == 2_500_000
    assert body["sandbox"] is False
    assert body["available_micros"] == 7_500_000
    assert body["held_micros"] == 0
    balance = await live.gateway.billing.balance(account)
    assert balance.available_micros == 7_500_000


async def test_json_numbers_are_read_without_a_float(live: LiveGateway) -> None:
    account, _key = await live.developer_key()
    # 0.1 has no exact float; as a float it would be 0.1000000000000000055511151231257827.
    response = await top_up(live, account, b'{"amount_usd": 0.1}')
    assert response.status_code == 200, response.text
    assert response.json()["amount_micros"] == 100_000
    too_fine = await top_up(live, account, b'{"amount_usd": 0.1000000000000000055511151231257827}')
    assert too_fine.status_code == 400
    assert too_fine.json()["error"]["param"] == "amount_usd"


async def test_top_up_in_micros_and_to_the_sandbox(live: LiveGateway) -> None:
    account, _key = await live.developer_key()
    response = await top_up(live, account, {"amount_micros": 1_234, "sandbox": True})
    assert response.status_code == 200, response.text
    assert response.json()["sandbox"] is True
    assert response.json()["available_micros"] == 1_234
    assert (await live.gateway.billing.balance(account)).available_micros == 5_000_000
    assert (await live.gateway.billing.balance(account, sandbox=True)).available_micros == 1_234


async def test_an_external_id_credits_once(live: LiveGateway) -> None:
    account, _key = await live.developer_key()
    first = await top_up(live, account, {"amount_usd": "1", "external_id": "grant-42"})
    again = await top_up(live, account, {"amount_usd": "1", "external_id": "grant-42"})
    assert first.status_code == again.status_code == 200
    assert first.json()["transaction_id"] == again.json()["transaction_id"]
    assert again.json()["available_micros"] == 6_000_000
    different = await top_up(live, account, {"amount_usd": "2", "external_id": "grant-42"})
    assert different.status_code == 400
    assert different.json()["error"]["param"] == "external_id"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "amount_usd"),
        ({"amount_usd": "1", "amount_micros": 1_000_000}, "amount_usd"),
        ({"amount_usd": "-1"}, "amount_usd"),
        ({"amount_usd": "0.0000001"}, "amount_usd"),
        ({"amount_usd": True}, "amount_usd"),
        ({"amount_micros": 0}, "amount_micros"),
        ({"amount_micros": 1.5}, "amount_micros"),
        ({"amount_micros": 10**16}, "amount_micros"),
        ({"amount_usd": "1", "sandbox": "yes"}, "sandbox"),
        ({"amount_usd": "1", "surprise": 1}, "surprise"),
    ],
)
async def test_bad_top_ups_name_the_field(
    live: LiveGateway, body: dict[str, Any], param: str
) -> None:
    account, _key = await live.developer_key()
    response = await top_up(live, account, body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert (await live.gateway.billing.balance(account)).available_micros == 5_000_000


async def test_malformed_bodies(live: LiveGateway) -> None:
    account, _key = await live.developer_key()
    for raw in (b"", b"{", b"[1]", b'{"amount_usd": NaN}'):
        response = await top_up(live, account, raw)
        assert response.status_code == 400, raw
        assert response.json()["error"]["code"] == "INVALID_REQUEST"


async def test_unknown_account_and_missing_admin_token(live: LiveGateway) -> None:
    missing = await top_up(live, "acct_doesnotexist", {"amount_usd": "1"})
    assert missing.status_code == 404
    account, key = await live.developer_key()
    for token in ("wrong-token", key):
        refused = await top_up(live, account, {"amount_usd": "1"}, token=token)
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "INVALID_ADMIN_TOKEN"
    assert (await live.gateway.billing.balance(account)).available_micros == 5_000_000


def test_cli_top_up(tmp_path: Path) -> None:
    env = {"SWARMGATE_DATA_DIR": str(tmp_path / "data")}

    def admin(*args: str) -> dict[str, Any]:
        done = run_cli("admin", *args, env=env)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        assert done.stdout.count("\n") == 1, done.stdout
        result: dict[str, Any] = orjson.loads(done.stdout)
        return result

    account = admin("--json", "accounts", "create", "--name", "dev")["id"]
    # --json after the command as well as before it
    first = admin("accounts", "top-up", account, "--usd", "5.25", "--memo", "promo", "--json")
    assert first["transaction_id"].startswith("txn_")
    assert first["amount_micros"] == 5_250_000
    assert first["available_micros"] == 5_250_000
    second = admin("--json", "accounts", "top-up", account, "--usd", "0.75")
    assert second["available_micros"] == 6_000_000
    sandbox = admin("--json", "accounts", "top-up", account, "--usd", "1", "--sandbox")
    assert sandbox["sandbox"] is True
    assert sandbox["available_micros"] == 1_000_000

    unknown = run_cli("admin", "--json", "accounts", "top-up", "acct_nope", "--usd", "1", env=env)
    assert unknown.returncode == 1
    assert orjson.loads(unknown.stdout)["error"]["code"] == "NOT_FOUND"
    too_fine = run_cli("admin", "accounts", "top-up", account, "--usd", "0.0000001", env=env)
    assert too_fine.returncode != 0
    assert "6 decimal places" in too_fine.stderr
