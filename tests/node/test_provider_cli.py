"""``swarmgate node register | login | status`` and the node's guard flags, as subprocesses
against a live gateway."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from swarmgate.config import NodeSettings
from swarmgate.node.registration import (
    NodeRegistration,
    RegistrationError,
    apply_registration,
    gateway_urls,
    load_registration,
    save_registration,
)
from tests.billing.test_earnings import record_job
from tests.conftest import ADMIN_TOKEN, MODEL, LiveGateway, free_port, run_cli, swarmgate_cmd


@pytest.fixture
def home(tmp_path: Path) -> dict[str, str]:
    """A home directory of the test's own: ~/.swarmgate/node.json lands there."""
    (tmp_path / "home").mkdir()
    return {
        "HOME": str(tmp_path / "home"),
        "SWARMGATE_NODE_TOKEN": "",
        "SWARMGATE_ADMIN_TOKEN": "",
    }


def saved_path(home: dict[str, str]) -> Path:
    return Path(home["HOME"]) / ".swarmgate" / "node.json"


async def cli(home: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    # In a thread: the gateway under test runs on this event loop.
    return await asyncio.to_thread(run_cli, *args, env=home)


async def cli_json(home: dict[str, str], *args: str, code: int = 0) -> dict[str, Any]:
    done = await cli(home, *args, "--json")
    assert done.returncode == code, (args, done.stdout, done.stderr)
    assert done.stdout.count("\n") == 1, done.stdout
    payload = orjson.loads(done.stdout)
    assert isinstance(payload, dict)
    return payload


async def admin_get(live: LiveGateway, path: str) -> list[dict[str, Any]]:
    async with live.client(ADMIN_TOKEN) as admin:
        data: list[dict[str, Any]] = (await admin.get(path)).json()["data"]
        return data


# -- register and login -----------------------------------------------------------------------
async def test_register_saves_a_working_token_readable_only_by_the_owner(
    live: LiveGateway, home: dict[str, str]
) -> None:
    result = await cli_json(
        home,
        "node",
        "register",
        "--gateway",
        live.base_url,
        "--admin-token",
        ADMIN_TOKEN,
        "--name",
        "pixel-7",
    )
    assert result["device_id"].startswith("dev_")
    assert result["account_id"].startswith("acct_")
    assert result["name"] == "pixel-7"
    assert result["gateway_url"] == live.ws_url
    assert result["config"] == str(saved_path(home))
    assert "token" not in result  # it goes to the file, not the terminal

    path = saved_path(home)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    saved = orjson.loads(path.read_bytes())
    assert saved["token"].startswith("sg_dev_")
    assert saved["device_id"] == result["device_id"]
    assert saved["gateway_url"] == live.ws_url
    assert saved["api_url"] == live.base_url

    accounts = await admin_get(live, "/admin/accounts")
    account = next(a for a in accounts if a["id"] == result["account_id"])
    assert (account["name"], account["provider"], account["developer"]) == ("pixel-7", True, False)
    devices = await admin_get(live, "/admin/devices")
    device = next(d for d in devices if d["id"] == result["device_id"])
    assert device["name"] == "pixel-7"
    assert saved["token"].startswith(device["token_prefix"])

    # Once is enough: a second register would orphan the saved token.
    again = await cli(
        home, "node", "register", "--gateway", live.base_url, "--admin-token", ADMIN_TOKEN,
        "--name", "pixel-7",
    )  # fmt: skip
    assert again.returncode == 2
    assert f"already registered as device {result['device_id']}" in again.stderr
    assert "--force" in again.stderr
    replaced = await cli_json(
        home, "node", "register", "--gateway", live.base_url, "--admin-token", ADMIN_TOKEN,
        "--name", "pixel-7", "--account", result["account_id"], "--force",
    )  # fmt: skip
    assert replaced["device_id"] != result["device_id"]
    assert replaced["account_id"] == result["account_id"]
    assert orjson.loads(path.read_bytes())["device_id"] == replaced["device_id"]


async def test_login_adds_this_machine_to_an_existing_account(
    live: LiveGateway, home: dict[str, str], tmp_path: Path
) -> None:
    async with live.client(ADMIN_TOKEN) as admin:
        account = (
            await admin.post("/admin/accounts", json={"name": "asha", "provider": True})
        ).json()
    config = tmp_path / "elsewhere" / "node.json"
    # The WebSocket address works as well as the HTTP one; the admin token may come from env.
    result = await cli_json(
        {**home, "SWARMGATE_ADMIN_TOKEN": ADMIN_TOKEN},
        "node", "login", "--gateway", live.ws_url, "--account", account["id"],
        "--config", str(config),
    )  # fmt: skip
    assert result["account_id"] == account["id"]
    assert result["name"]  # the host name
    assert result["config"] == str(config)
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert not saved_path(home).exists()
    devices = await admin_get(live, "/admin/devices")
    assert {d["account_id"] for d in devices if d["id"] == result["device_id"]} == {account["id"]}


@pytest.mark.parametrize(
    ("args", "env", "code", "message"),
    [
        (["--admin-token", "wrong-token", "--name", "x"], {}, 1, "Missing or invalid admin token"),
        (["--name", "x"], {}, 2, "an admin token is needed"),
        (
            ["--name", "x", "--account", "acct_nope", "--admin-token", ADMIN_TOKEN],
            {},
            1,
            "no account",
        ),
    ],
)
async def test_register_failures_save_nothing(
    live: LiveGateway,
    home: dict[str, str],
    args: list[str],
    env: dict[str, str],
    code: int,
    message: str,
) -> None:
    done = await cli({**home, **env}, "node", "register", "--gateway", live.base_url, *args)
    assert done.returncode == code, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert not saved_path(home).exists()
    as_json = await cli_json(
        {**home, **env}, "node", "register", "--gateway", live.base_url, *args, code=code
    )
    assert message in as_json["error"]["message"]


async def test_register_with_no_gateway_listening(home: dict[str, str]) -> None:
    done = await cli(
        home, "node", "register", "--gateway", f"http://127.0.0.1:{free_port()}",
        "--admin-token", ADMIN_TOKEN, "--name", "x",
    )  # fmt: skip
    assert done.returncode == 1
    assert "cannot reach the gateway" in done.stderr
    bad = await cli(home, "node", "register", "--gateway", "gateway.example", "--name", "x")
    assert bad.returncode == 2
    assert "not a gateway URL" in bad.stderr


# -- status -----------------------------------------------------------------------------------
def _start_node(home: dict[str, str], log: Path, *flags: str) -> subprocess.Popen[bytes]:
    """``swarmgate node`` with no --token and no --gateway: both come from node.json."""
    with log.open("wb") as out:
        return subprocess.Popen(  # noqa: S603 - our own CLI
            swarmgate_cmd("node", "--backend", "sim", "--sim-length", "6", *flags),
            env={
                **os.environ,
                **home,
                "SWARMGATE_NODE_RECONNECT_MIN_S": "0.1",
                "SWARMGATE_NODE_RECONNECT_MAX_S": "0.2",
                "SWARMGATE_NODE_GUARD_INTERVAL_S": "0.2",
            },
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)


async def _wait_state(
    live: LiveGateway, home: dict[str, str], device_id: str, state: str
) -> dict[str, Any]:
    """Waits on the gateway itself (cheap), then asks ``node status`` once."""
    deadline = asyncio.get_running_loop().time() + 20
    while True:
        device = live.gateway.registry.get(device_id)
        if device is not None and device.state.value == state:
            break
        assert asyncio.get_running_loop().time() < deadline, f"the device never became {state}"
        await asyncio.sleep(0.02)
    report = await cli_json(home, "node", "status", "--admin-token", ADMIN_TOKEN)
    assert report["state"] == state, report
    return report


async def test_status_from_registration_to_serving(
    live: LiveGateway, home: dict[str, str], tmp_path: Path
) -> None:
    registered = await cli_json(
        home, "node", "register", "--gateway", live.base_url, "--admin-token", ADMIN_TOKEN,
        "--name", "old-phone",
    )  # fmt: skip
    developer, _ = await live.developer_key()
    await record_job(
        live.gateway.engine, developer=developer, provider=registered["account_id"],
        device_id=registered["device_id"], cost=1_000, when=datetime.now(UTC),
    )  # fmt: skip

    offline = await cli_json(home, "node", "status", "--admin-token", ADMIN_TOKEN)
    assert offline["device_id"] == registered["device_id"]
    assert offline["name"] == "old-phone"
    assert offline["gateway"] == live.base_url
    assert offline["state"] == "offline"
    assert offline["models"] == []
    # Earnings and trust come from the gateway with the saved device token.
    earnings = offline["earnings"]
    assert earnings["today"] == {
        "jobs": 1, "tokens": 30, "earned_micros": 850, "earned_usd": "0.000850"
    }  # fmt: skip
    assert earnings["all_time"]["jobs"] == 1
    assert earnings["account"]["withdrawable_micros"] == 850
    assert offline["trust_score"] == 0.0  # a new device has earned no trust yet
    assert offline["trust"]["trusted"] is False and offline["trust"]["suspended"] is False
    local = offline["local"]
    assert set(local) >= {"battery_percent", "charging", "temperature_c", "cpu_percent", "guard"}
    assert local["guard"]["paused"] in (True, False)

    process = _start_node(home, tmp_path / "node.log")
    try:
        ready = await _wait_state(live, home, registered["device_id"], "ready")
        assert ready["models"] == [MODEL]
        assert ready["jobs_served"] == 0
        _, key = await live.developer_key()
        async with live.client(key) as client:
            reply = await client.post(
                "/v1/chat/completions",
                json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
            )
        assert reply.status_code == 200, reply.text
        assert reply.json()["swarmgate"]["device_id"] == registered["device_id"]
        served = await cli_json(home, "node", "status", "--admin-token", ADMIN_TOKEN)
        assert served["jobs_served"] == 1

        human = await cli(home, "node", "status", "--admin-token", ADMIN_TOKEN)
        assert human.returncode == 0, human.stderr
        lines = human.stdout.splitlines()
        assert f"device       {registered['device_id']} (old-phone)" in lines
        assert "state        ready" in lines
        assert f"models       {MODEL}" in lines
        assert "jobs served  1 this connection (0 running)" in lines
        earned = next(line for line in lines if line.startswith("earnings     "))
        assert earned.startswith("earnings     $0.00")
        assert " today, $" in earned and " in 30 days, $" in earned and " all time (" in earned
        assert any(line.startswith("withdrawable $0.00") for line in lines)
        trust = next(line for line in lines if line.startswith("trust score  "))
        assert trust.startswith("trust score  0.0") and "not trusted yet" in trust
        assert served["trust_score"] > 0  # one job served: a little reliability
        assert any(line.startswith("this device  ") for line in lines)
        assert any(line.startswith("guard        would ") for line in lines)
    finally:
        await asyncio.to_thread(_stop, process)


async def test_the_schedule_flag_pauses_a_real_node(
    live: LiveGateway, home: dict[str, str], tmp_path: Path
) -> None:
    registered = await cli_json(
        home, "node", "register", "--gateway", live.base_url, "--admin-token", ADMIN_TOKEN,
        "--name", "night-owl",
    )  # fmt: skip
    hour = datetime.now(UTC).hour
    window = f"{(hour + 2) % 24:02d}:00-{(hour + 3) % 24:02d}:00"  # never now
    process = _start_node(home, tmp_path / "node.log", "--schedule", window, "--timezone", "UTC")
    try:
        report = await _wait_state(live, home, registered["device_id"], "paused")
        assert report["pause_reason"] == f"outside scheduled hours {window}"
        _, key = await live.developer_key()
        async with live.client(key) as client:
            refused = await client.post(
                "/v1/chat/completions",
                json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
            )
        assert refused.status_code == 503
        human = await cli(home, "node", "status", "--admin-token", ADMIN_TOKEN)
        assert f"state        paused: outside scheduled hours {window}" in human.stdout.splitlines()
    finally:
        await asyncio.to_thread(_stop, process)


async def test_status_without_what_it_needs(live: LiveGateway, home: dict[str, str]) -> None:
    nothing = await cli(home, "node", "status")
    assert nothing.returncode == 2
    assert "no saved registration" in nothing.stderr

    await cli_json(
        home, "node", "register", "--gateway", live.base_url, "--admin-token", ADMIN_TOKEN,
        "--name", "x",
    )  # fmt: skip
    # No admin token: the local half only, and a note saying why.
    local_only = await cli_json(home, "node", "status")
    assert local_only["state"] is None
    assert any("admin token" in note for note in local_only["notes"])
    assert "local" in local_only

    wrong = await cli_json(home, "node", "status", "--admin-token", "wrong", code=1)
    assert any("Missing or invalid admin token" in note for note in wrong["notes"])
    wrong_human = await cli(home, "node", "status", "--admin-token", "wrong")
    assert wrong_human.returncode == 1
    assert "Missing or invalid admin token" in wrong_human.stderr
    # The device's own token still reads its earnings.
    assert "earnings     $0.000000 today, $0.000000 in 30 days" in wrong_human.stdout
    assert local_only["earnings"]["all_time"]["jobs"] == 0

    unknown = await cli_json(
        home, "node", "status", "--admin-token", ADMIN_TOKEN, "--device", "dev_nope", code=1
    )
    assert any("has no device dev_nope" in note for note in unknown["notes"])
    assert unknown["earnings"] is None
    assert any("device's own token" in note for note in unknown["notes"])


# -- the node command's own checks -----------------------------------------------------------
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--schedule", "evenings"], "not a time window"),
        (["--schedule", "22:00-07:00", "--timezone", "Mars/Base"], "unknown time zone"),
        (["--min-battery", "150"], "battery"),
    ],
)
def test_node_refuses_bad_guard_flags(home: dict[str, str], flags: list[str], message: str) -> None:
    done = run_cli("node", "--backend", "sim", "--token", "sg_dev_x", *flags, env=home)
    assert done.returncode == 2
    assert "bad device guard setting" in done.stderr
    assert message in done.stderr


def test_node_with_a_broken_saved_registration(home: dict[str, str]) -> None:
    path = saved_path(home)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    done = run_cli("node", "--backend", "sim", env=home)
    assert done.returncode == 2
    assert "is not a node registration" in done.stderr
    assert "Traceback" not in done.stderr


def test_node_without_any_token_points_at_register(home: dict[str, str]) -> None:
    done = run_cli("node", "--backend", "sim", env=home)
    assert done.returncode == 2
    assert "a device token is needed" in done.stderr
    assert "swarmgate node register" in done.stderr


# -- the saved registration -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("url", "http", "ws"),
    [
        ("http://h:8080", "http://h:8080", "ws://h:8080/v1/nodes/connect"),
        ("http://h:8080/", "http://h:8080", "ws://h:8080/v1/nodes/connect"),
        ("https://gw.example", "https://gw.example", "wss://gw.example/v1/nodes/connect"),
        ("ws://h:8080/v1/nodes/connect", "http://h:8080", "ws://h:8080/v1/nodes/connect"),
        (
            "wss://gw.example/v1/nodes/connect/",
            "https://gw.example",
            "wss://gw.example/v1/nodes/connect",
        ),
        ("https://gw.example/sg", "https://gw.example/sg", "wss://gw.example/sg/v1/nodes/connect"),
        (" http://[::1]:8080 ", "http://[::1]:8080", "ws://[::1]:8080/v1/nodes/connect"),
    ],
)
def test_gateway_urls(url: str, http: str, ws: str) -> None:
    assert gateway_urls(url) == (http, ws)


@pytest.mark.parametrize("url", ["gateway.example", "ftp://h", "http://", "", "/v1/nodes/connect"])
def test_gateway_urls_refuses(url: str) -> None:
    with pytest.raises(ValueError, match="not a gateway URL"):
        gateway_urls(url)


def _registration() -> NodeRegistration:
    return NodeRegistration(
        gateway_url="ws://saved:1/v1/nodes/connect",
        api_url="http://saved:1",
        token="sg_dev_saved",
        device_id="dev_1",
        account_id="acct_1",
    )


def test_save_replaces_a_world_readable_file_with_a_private_one(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "node.json"
    path.parent.mkdir()
    path.write_text("old")
    path.chmod(0o644)
    save_registration(_registration(), path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_registration(path) == _registration()
    assert [p.name for p in path.parent.iterdir()] == ["node.json"]  # no temporary left


@pytest.mark.parametrize(
    "content", [b"", b"[]", b'"x"', b'{"token": "only"}', b'{"gateway_url": 1', b"\xff"]
)
def test_load_refuses_what_is_not_a_registration(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "node.json"
    path.write_bytes(content)
    with pytest.raises(RegistrationError, match="not a node registration"):
        load_registration(path)


def test_flags_and_environment_win_over_the_saved_registration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "node.json"
    save_registration(_registration(), path)
    for name in ("SWARMGATE_NODE_TOKEN", "SWARMGATE_NODE_GATEWAY_URL"):
        monkeypatch.delenv(name, raising=False)

    filled = apply_registration(NodeSettings(config_path=path))
    assert (filled.token, filled.gateway_url) == ("sg_dev_saved", "ws://saved:1/v1/nodes/connect")
    gateway_given = apply_registration(NodeSettings(config_path=path, gateway_url="ws://mine"))
    assert (gateway_given.token, gateway_given.gateway_url) == ("sg_dev_saved", "ws://mine")
    token_given = apply_registration(NodeSettings(config_path=path, token="sg_dev_flag"))
    assert (token_given.token, token_given.gateway_url) == (
        "sg_dev_flag",
        NodeSettings().gateway_url,
    )
    monkeypatch.setenv("SWARMGATE_NODE_GATEWAY_URL", "ws://from-env")
    assert apply_registration(NodeSettings(config_path=path)).gateway_url == "ws://from-env"
    missing = apply_registration(NodeSettings(config_path=tmp_path / "none.json"))
    assert missing.token == ""
