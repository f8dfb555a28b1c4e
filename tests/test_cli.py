"""``swarmgate admin … --json``: one JSON object on stdout, errors included."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import MODEL, run_cli


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {"SWARMGATE_DATA_DIR": str(tmp_path / "data")}


def one_object(stdout: str) -> dict[str, Any]:
    """stdout holds exactly one JSON object (and its newline), nothing else."""
    assert stdout.endswith("\n"), stdout
    assert stdout.count("\n") == 1, stdout
    payload = orjson.loads(stdout)  # raises on anything after the first value
    assert isinstance(payload, dict)
    return payload


def admin(env: dict[str, str], *args: str) -> dict[str, Any]:
    done = run_cli("admin", "--json", *args, env=env)
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return one_object(done.stdout)


def test_accounts_commands_print_one_json_object(env: dict[str, str]) -> None:
    developer = admin(
        env,
        "accounts",
        "create",
        "--name",
        "dev",
        "--email",
        "dev@example.com",
        "--credits",
        "5.25",
    )
    assert developer["id"].startswith("acct_")
    assert developer["name"] == "dev"
    assert developer["email"] == "dev@example.com"
    assert developer["credit_micros"] == 5_250_000
    assert developer["developer"] is True
    assert developer["provider"] is False

    provider = admin(env, "accounts", "create", "--name", "prov", "--provider")
    assert provider["provider"] is True
    assert provider["credit_micros"] == 0

    listed = admin(env, "accounts", "list")
    assert listed["object"] == "list"
    assert {a["id"] for a in listed["data"]} == {developer["id"], provider["id"]}


def test_keys_commands_print_one_json_object(env: dict[str, str]) -> None:
    developer = admin(env, "accounts", "create", "--name", "dev")
    live_key = admin(env, "keys", "create", "--account", developer["id"], "--name", "ci")
    assert live_key["key"].startswith("sg_live_")
    assert live_key["account_id"] == developer["id"]
    assert live_key["key"].startswith(live_key["prefix"])
    test_key = admin(env, "keys", "create", "--account", developer["id"], "--test")
    assert test_key["key"].startswith("sg_test_")
    assert test_key["id"] != live_key["id"]

    listed = admin(env, "keys", "list", "--account", developer["id"])
    assert {k["id"] for k in listed["data"]} == {live_key["id"], test_key["id"]}
    assert all("key" not in k for k in listed["data"])  # secrets are shown once only

    rotated = admin(env, "keys", "rotate", live_key["id"], "--account", developer["id"])
    assert rotated["key"].startswith("sg_live_") and rotated["key"] != live_key["key"]
    assert rotated["name"] == "ci"
    assert rotated["replaced"]["status"] == "revoked"

    revoked = admin(env, "keys", "revoke", test_key["id"], "--account", developer["id"])
    assert revoked["status"] == "revoked"
    other = admin(env, "accounts", "create", "--name", "other")
    refused = run_cli(
        "admin", "--json", "keys", "revoke", rotated["id"], "--account", other["id"], env=env
    )
    assert refused.returncode == 1
    assert orjson.loads(refused.stdout)["error"]["code"] == "NOT_FOUND"


def test_devices_commands_print_one_json_object(env: dict[str, str]) -> None:
    provider = admin(env, "accounts", "create", "--name", "prov", "--provider")
    device = admin(env, "devices", "create", "--account", provider["id"], "--name", "laptop")
    assert device["id"].startswith("dev_")
    assert device["token"].startswith("sg_dev_")
    assert device["account_id"] == provider["id"]
    devices = admin(env, "devices", "list")
    assert devices["object"] == "list"
    assert [d["id"] for d in devices["data"]] == [device["id"]]
    assert all("token" not in d for d in devices["data"])  # secrets are shown once only


def test_models_list_prints_one_json_object(env: dict[str, str]) -> None:
    models = admin(env, "models", "list")
    assert models["object"] == "list"
    by_id = {m["id"]: m for m in models["data"]}
    assert by_id[MODEL]["tier"] == "p2p"
    assert by_id[MODEL]["context_length"] == 8192
    assert len(by_id[MODEL]["sha256"]) == 64


def test_lists_on_an_empty_database_are_empty_objects(env: dict[str, str]) -> None:
    assert admin(env, "accounts", "list") == {"object": "list", "data": []}
    assert admin(env, "devices", "list") == {"object": "list", "data": []}


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (("keys", "create", "--account", "acct_doesnotexist"), "NOT_FOUND"),
        (("keys", "create", "--account", "acct_doesnotexist", "--test"), "NOT_FOUND"),
        (("devices", "create", "--account", "acct_doesnotexist"), "NOT_FOUND"),
    ],
    ids=["live-key", "test-key", "device"],
)
def test_errors_print_one_json_error_object_and_exit_1(
    env: dict[str, str], args: tuple[str, ...], code: str
) -> None:
    done = run_cli("admin", "--json", *args, env=env)
    assert done.returncode == 1, (done.stdout, done.stderr)
    payload = one_object(done.stdout)
    assert set(payload) == {"error"}
    assert payload["error"]["code"] == code
    assert "acct_doesnotexist" in payload["error"]["message"]
    assert payload["error"]["param"] == "account"
    assert "Traceback" not in done.stderr


def test_duplicate_email_is_a_json_error(env: dict[str, str]) -> None:
    admin(env, "accounts", "create", "--name", "a", "--email", "same@example.com")
    done = run_cli(
        "admin",
        "--json",
        "accounts",
        "create",
        "--name",
        "b",
        "--email",
        "same@example.com",
        env=env,
    )
    assert done.returncode == 1
    error = one_object(done.stdout)["error"]
    assert error["code"] == "INVALID_REQUEST"
    assert error["param"] == "email"


def test_errors_without_json_go_to_stderr(env: dict[str, str]) -> None:
    done = run_cli("admin", "keys", "create", "--account", "acct_doesnotexist", env=env)
    assert done.returncode == 1
    assert done.stdout == ""
    assert "error: no account 'acct_doesnotexist'" in done.stderr


@pytest.mark.parametrize(
    ("credits", "micros"),
    [
        ("5.25", 5_250_000),
        ("0", 0),
        ("0.000001", 1),
        ("1e2", 100_000_000),
        ("12.340000", 12_340_000),
    ],
)
def test_credits_are_parsed_exactly(env: dict[str, str], credits: str, micros: int) -> None:
    created = admin(env, "accounts", "create", "--name", "c", "--credits", credits)
    assert created["credit_micros"] == micros
    assert isinstance(created["credit_micros"], int)


@pytest.mark.parametrize(
    "credits",
    [
        "0.0000001",
        "-1",
        "-0.5",
        "abc",
        "",
        "1.2345678",
        "nan",
        "sNaN",
        "inf",
        "-Infinity",
        "9223372036854.775808",  # one micro-dollar past what a signed 64-bit column holds
        "1e30",
        "1e999999",
        "-1e999999",
    ],
)
def test_bad_credits_are_refused_by_argparse(env: dict[str, str], credits: str) -> None:
    done = run_cli(
        "admin", "--json", "accounts", "create", "--name", "c", "--credits", credits, env=env
    )
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stdout == ""
    assert "argument --credits" in done.stderr
    # Refused while parsing the command line: the database was never even opened.
    assert not (Path(env["SWARMGATE_DATA_DIR"]) / "swarmgate.db").exists()


def test_credits_refusal_leaves_existing_data_alone(env: dict[str, str]) -> None:
    done = run_cli(
        "admin", "--json", "accounts", "create", "--name", "c", "--credits", "0.0000001", env=env
    )
    assert done.returncode == 2
    assert admin(env, "accounts", "list")["data"] == []
