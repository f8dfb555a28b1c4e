"""``swarmgate node register | login | status``: a provider's commands for this machine.

``register`` and ``login`` get a device token through the gateway's admin API and save it
(see ``registration.py``) so that a plain ``swarmgate node`` finds it. ``status`` shows what
the gateway sees of this device and what it earned, next to what the device guard reads here.

Every command takes ``--json`` and then prints exactly one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson

from swarmgate.config import NodeSettings
from swarmgate.node.guard import (
    DeviceGuard,
    Readings,
    SystemSensors,
    decide,
    guard_from_settings,
    policy_from_settings,
)
from swarmgate.node.registration import (
    NodeRegistration,
    RegistrationError,
    apply_registration,
    gateway_urls,
    load_registration,
    registration_path,
    save_registration,
)

ADMIN_TOKEN_ENV = "SWARMGATE_ADMIN_TOKEN"  # noqa: S105 - a variable name, not a secret


class ProviderCommandError(Exception):
    """A command cannot go on; ``exit_code`` 2 for a usage problem, 1 for anything else."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def add_provider_commands(node_commands: Any) -> None:
    """Adds register, login and status to the ``node`` command's subcommands."""
    register = node_commands.add_parser(
        "register", help="create a device (and a provider account) and save its token here"
    )
    _add_gateway_args(register, gateway_required=True)
    register.add_argument("--name", required=True, help="a name for this device")
    register.add_argument("--account", help="an existing account id (default: a new account)")
    register.add_argument("--force", action="store_true", help="replace a saved registration")
    register.set_defaults(func=cmd_node_register)

    login = node_commands.add_parser(
        "login", help="add this machine to an existing provider account and save its token"
    )
    _add_gateway_args(login, gateway_required=True)
    login.add_argument("--account", required=True, help="your provider account id")
    login.add_argument("--name", help="a name for this device (default: the host name)")
    login.add_argument("--force", action="store_true", help="replace a saved registration")
    login.set_defaults(func=cmd_node_login)

    status = node_commands.add_parser(
        "status", help="this device as the gateway sees it, and its local guard readings"
    )
    _add_gateway_args(status, gateway_required=False)
    status.add_argument("--device", help="device id (default: the saved registration's)")
    status.set_defaults(func=cmd_node_status)


def _add_gateway_args(parser: argparse.ArgumentParser, *, gateway_required: bool) -> None:
    parser.add_argument(
        "--gateway",
        dest="gateway_url",
        required=gateway_required,
        default=None if gateway_required else argparse.SUPPRESS,
        help="the gateway, e.g. https://gateway.example or ws://host:8080/v1/nodes/connect",
    )
    parser.add_argument("--admin-token", help=f"the gateway's admin token ({ADMIN_TOKEN_ENV})")
    parser.add_argument(
        "--config",
        dest="config_path",
        type=Path,
        default=argparse.SUPPRESS,
        help="where the registration is saved (default ~/.swarmgate/node.json)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


# -- running a command ---------------------------------------------------------------------
def _run(args: argparse.Namespace, command: Any) -> int:
    """Runs ``command(args) -> (result, exit code)`` and reports its errors."""
    try:
        result, code = command(args)
    except (ProviderCommandError, RegistrationError) as exc:
        code = exc.exit_code if isinstance(exc, ProviderCommandError) else 1
        if args.json:
            sys.stdout.write(orjson.dumps({"error": {"message": str(exc)}}).decode() + "\n")
        else:
            print(f"swarmgate node: {exc}", file=sys.stderr)
        return code
    if args.json:
        sys.stdout.write(orjson.dumps(result).decode() + "\n")
    return int(code)


def _settings(args: argparse.Namespace) -> NodeSettings:
    config = getattr(args, "config_path", None)
    return NodeSettings(config_path=config) if config is not None else NodeSettings()


def _admin_token(args: argparse.Namespace) -> str | None:
    return args.admin_token or os.environ.get(ADMIN_TOKEN_ENV) or None


def _require_admin_token(args: argparse.Namespace) -> str:
    token = _admin_token(args)
    if token is None:
        raise ProviderCommandError(
            f"an admin token is needed (--admin-token or {ADMIN_TOKEN_ENV})", exit_code=2
        )
    return token


def _urls(url: str) -> tuple[str, str]:
    try:
        return gateway_urls(url)
    except ValueError as exc:
        raise ProviderCommandError(str(exc), exit_code=2) from None


def _admin_call(
    client: httpx.Client, method: str, path: str, body: dict[str, Any] | None = None
) -> Any:
    try:
        response = client.request(method, path, json=body)
    except httpx.HTTPError as exc:
        raise ProviderCommandError(
            f"cannot reach the gateway at {client.base_url}: {exc or type(exc).__name__}"
        ) from exc
    if response.is_success:
        return response.json()
    try:
        error = response.json()["error"]
        message = f"{error['message']} ({error.get('code') or response.status_code})"
    except (ValueError, KeyError, TypeError):
        message = f"HTTP {response.status_code}"
    raise ProviderCommandError(f"the gateway refused {method} {path}: {message}")


def _admin_client(api_url: str, token: str) -> httpx.Client:
    return httpx.Client(
        base_url=api_url, headers={"Authorization": f"Bearer {token}"}, timeout=15.0
    )


# -- register and login --------------------------------------------------------------------
def cmd_node_register(args: argparse.Namespace) -> int:
    return _run(args, _register)


def cmd_node_login(args: argparse.Namespace) -> int:
    return _run(args, _register)


def _register(args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    api_url, ws_url = _urls(args.gateway_url)
    token = _require_admin_token(args)
    path = registration_path(_settings(args))
    saved = load_registration(path) if not args.force else None
    if saved is not None:
        raise ProviderCommandError(
            f"this machine is already registered as device {saved.device_id} ({path}); "
            "pass --force to replace it",
            exit_code=2,
        )
    name = args.name or socket.gethostname()
    with _admin_client(api_url, token) as client:
        account_id = args.account
        if account_id is None:
            account = _admin_call(
                client,
                "POST",
                "/admin/accounts",
                {"name": name, "developer": False, "provider": True},
            )
            account_id = account["id"]
        device = _admin_call(
            client, "POST", "/admin/devices", {"account_id": account_id, "name": name}
        )
    registration = NodeRegistration(
        gateway_url=ws_url,
        api_url=api_url,
        token=device["token"],
        device_id=device["id"],
        account_id=device["account_id"],
        name=name,
        created_at=device.get("created_at", ""),
    )
    save_registration(registration, path)
    result = {
        "device_id": registration.device_id,
        "account_id": registration.account_id,
        "name": name,
        "gateway_url": ws_url,
        "token_prefix": device.get("prefix"),
        "config": str(path),
    }
    if not args.json:
        print(f"registered device {registration.device_id} ({name})")
        print(f"account     {registration.account_id}")
        print(f"gateway     {ws_url}")
        print(f"token       saved to {path} (readable by you only)")
        print("start serving with: swarmgate node")
    return result, 0


# -- status --------------------------------------------------------------------------------
def cmd_node_status(args: argparse.Namespace) -> int:
    return _run(args, _status)


async def _read_local(settings: NodeSettings) -> tuple[Readings, dict[str, Any]]:
    sensors = SystemSensors()
    await asyncio.sleep(0.3)  # CPU load is measured between two reads
    readings = await sensors.read()
    try:
        decision = decide(readings, policy_from_settings(settings), datetime.now(UTC))
    except ValueError as exc:
        return readings, {"paused": None, "reason": None, "error": str(exc)}
    return readings, {"paused": decision.paused, "reason": decision.reason}


def _status(args: argparse.Namespace) -> tuple[dict[str, Any], int]:
    settings = _settings(args)
    path = registration_path(settings)
    saved = load_registration(path)
    device_id = args.device or (saved.device_id if saved else None)
    if device_id is None:
        raise ProviderCommandError(
            f"no saved registration at {path}: run `swarmgate node register` or pass --device",
            exit_code=2,
        )
    gateway = getattr(args, "gateway_url", None) or (saved.api_url if saved else None)
    report: dict[str, Any] = {
        "device_id": device_id,
        "name": saved.name if saved and saved.device_id == device_id else None,
        "account_id": saved.account_id if saved and saved.device_id == device_id else None,
        "gateway": None,
        "state": None,
        "pause_reason": None,
        "models": [],
        "active_jobs": None,
        "jobs_served": None,
        "last_seen_at": None,
        "earnings": None,
        "trust_score": None,
        "trust": None,
        "notes": [],
    }
    failure: str | None = None
    token = _admin_token(args)
    if gateway is None:
        report["notes"].append("no gateway known: pass --gateway")
    elif token is None:
        report["gateway"] = _urls(gateway)[0]
        report["notes"].append(
            f"the gateway's view needs its admin token (--admin-token or {ADMIN_TOKEN_ENV})"
        )
    else:
        api_url = _urls(gateway)[0]
        report["gateway"] = api_url
        try:
            _fill_from_gateway(report, api_url, token, device_id)
        except ProviderCommandError as exc:
            failure = str(exc)
            report["notes"].append(failure)
    device_token = saved.token if saved and saved.device_id == device_id else None
    if gateway is not None and device_token is None:
        report["notes"].append(
            "earnings are shown with the device's own token: run `swarmgate node register` here"
        )
    elif gateway is not None and device_token is not None:
        try:
            report["earnings"] = _fetch_earnings(_urls(gateway)[0], device_token)
        except ProviderCommandError as exc:
            report["notes"].append(f"earnings: {exc}")
        try:
            report["trust"] = _fetch_trust(_urls(gateway)[0], device_token, "/v1/nodes/trust")
        except ProviderCommandError as exc:
            report["notes"].append(f"trust: {exc}")
    if report["trust"] is None and gateway is not None and token is not None and not failure:
        try:
            report["trust"] = _fetch_trust(
                _urls(gateway)[0], token, f"/admin/devices/{device_id}/trust"
            )
        except ProviderCommandError as exc:
            report["notes"].append(f"trust: {exc}")
    if report["trust"] is not None:
        report["trust_score"] = report["trust"]["trust_score"]
    readings, guard = asyncio.run(_read_local(settings))
    report["local"] = {
        "battery_percent": readings.battery_percent,
        "charging": readings.charging,
        "temperature_c": readings.temperature_c,
        "temperature_source": readings.temperature_source,
        "cpu_percent": readings.cpu_percent,
        "guard": guard,
    }
    if not args.json:
        _print_status(report, failure)
        if failure is not None:
            print(f"swarmgate node: {failure}", file=sys.stderr)
    return report, 0 if failure is None else 1


def _fill_from_gateway(report: dict[str, Any], api_url: str, token: str, device_id: str) -> None:
    with _admin_client(api_url, token) as client:
        listed = _admin_call(client, "GET", "/admin/devices")
    device = next((d for d in listed.get("data", []) if d.get("id") == device_id), None)
    if device is None:
        raise ProviderCommandError(f"the gateway at {api_url} has no device {device_id}")
    report["name"] = device.get("name") or report["name"]
    report["account_id"] = device.get("account_id")
    report["last_seen_at"] = device.get("last_seen_at")
    connection = device.get("connection")
    if connection is None:
        report["state"] = "offline"
        return
    report["state"] = connection.get("state")
    report["pause_reason"] = connection.get("pause_reason")
    report["models"] = connection.get("models", [])
    report["active_jobs"] = connection.get("active_jobs")
    report["jobs_served"] = connection.get("jobs_served")


def _fetch_earnings(api_url: str, device_token: str) -> dict[str, Any]:
    """The device's own earnings; the device token is enough, no admin token needed."""
    with _admin_client(api_url, device_token) as client:
        body = _admin_call(client, "GET", "/v1/nodes/earnings")
    return {
        "today": body["today"],
        "last_30_days": body["last_30_days"],
        "all_time": body["all_time"],
        "account": body["account"],
    }


def _fetch_trust(api_url: str, token: str, path: str) -> dict[str, Any]:
    """The device's trust score and record (device token, or the admin token)."""
    with _admin_client(api_url, token) as client:
        body = _admin_call(client, "GET", path)
    keys = (
        "trust_score",
        "trusted",
        "verified",
        "verified_by",
        "suspended",
        "suspended_reason",
        "suspicions",
        "canaries_passed",
        "canaries_failed",
    )
    return {key: body.get(key) for key in keys}


def _describe_trust(trust: dict[str, Any]) -> str:
    parts = ["trusted" if trust["trusted"] else "not trusted yet (needs > 0.8)"]
    if trust["verified"]:
        parts.append(f"verified ({trust['verified_by']})")
    passed, failed = trust["canaries_passed"] or 0, trust["canaries_failed"] or 0
    if passed or failed:
        parts.append(f"{passed} of {passed + failed} canaries passed")
    if trust["suspended"]:
        parts.append(f"SUSPENDED: {trust['suspended_reason']}")
    elif trust["suspicions"]:
        parts.append(f"{trust['suspicions']} suspicion(s)")
    return f"{trust['trust_score']:.2f} ({'; '.join(parts)})"


def _describe_earnings(earnings: dict[str, Any]) -> tuple[str, str]:
    jobs = earnings["all_time"]["jobs"]
    earned = (
        f"${earnings['today']['earned_usd']} today, "
        f"${earnings['last_30_days']['earned_usd']} in 30 days, "
        f"${earnings['all_time']['earned_usd']} all time ({jobs} job{'' if jobs == 1 else 's'})"
    )
    return earned, f"${earnings['account']['withdrawable_usd']} (the whole account)"


def _print_status(report: dict[str, Any], failure: str | None) -> None:
    def row(label: str, value: object) -> None:
        print(f"{label:<13}{value}")

    name = f" ({report['name']})" if report["name"] else ""
    row("device", f"{report['device_id']}{name}")
    if report["account_id"]:
        row("account", report["account_id"])
    row("gateway", report["gateway"] or "unknown")
    state = report["state"] or "unknown"
    if report["pause_reason"]:
        state += f": {report['pause_reason']}"
    row("state", state)
    row("models", ", ".join(report["models"]) or "none")
    if report["jobs_served"] is not None:
        running = report["active_jobs"] or 0
        row("jobs served", f"{report['jobs_served']} this connection ({running} running)")
    else:
        row("jobs served", "unknown")
    if report["earnings"] is not None:
        earned, withdrawable = _describe_earnings(report["earnings"])
        row("earnings", earned)
        row("withdrawable", withdrawable)
    else:
        row("earnings", "unknown")
    row("trust score", _describe_trust(report["trust"]) if report["trust"] else "unknown")
    local = report["local"]
    row("this device", _describe_readings(local))
    guard = local["guard"]
    if guard.get("error"):
        row("guard", f"bad setting: {guard['error']}")
    elif guard["paused"]:
        row("guard", f"would pause: {guard['reason']}")
    else:
        row("guard", "would serve")
    for note in report["notes"]:
        if note != failure:
            print(f"note: {note}")


def _describe_readings(local: dict[str, Any]) -> str:
    parts = []
    if local["battery_percent"] is not None:
        plug = {True: " charging", False: " not charging", None: ""}[local["charging"]]
        parts.append(f"battery {local['battery_percent']:g}%{plug}")
    if local["temperature_c"] is not None:
        source = f" ({local['temperature_source']})" if local["temperature_source"] else ""
        parts.append(f"temperature {local['temperature_c']:.1f} °C{source}")
    if local["cpu_percent"] is not None:
        parts.append(f"cpu {local['cpu_percent']:.0f}%")
    return ", ".join(parts) or "no sensor readings"


# -- running the node ----------------------------------------------------------------------
# ``swarmgate node`` flags whose values go straight into NodeSettings.
NODE_RUN_SETTINGS = (
    "guard",
    "min_battery_percent",
    "max_temperature_c",
    "charging_only",
    "schedule",
    "timezone",
    "config_path",
)


def add_node_run_args(node: argparse.ArgumentParser) -> None:
    """The device guard's flags, and where the saved registration is."""
    node.add_argument(
        "--config",
        dest="config_path",
        type=Path,
        help="saved registration (SWARMGATE_NODE_CONFIG_PATH; default ~/.swarmgate/node.json)",
    )
    group = node.add_argument_group(
        "device guard", "the node stops taking new jobs by itself while any of these holds"
    )
    group.add_argument(
        "--min-battery",
        dest="min_battery_percent",
        type=float,
        metavar="PERCENT",
        help="pause below this battery level when not charging (default 20)",
    )
    group.add_argument(
        "--max-temperature",
        dest="max_temperature_c",
        type=float,
        metavar="CELSIUS",
        help="pause above this temperature (default 45 for a battery, 85 for a CPU sensor)",
    )
    group.add_argument(
        "--charging-only",
        action="store_true",
        default=None,
        help="serve only while on external power",
    )
    group.add_argument(
        "--schedule",
        metavar="HH:MM-HH:MM[,...]",
        help="serve only in these hours, e.g. 22:00-07:00 (may cross midnight)",
    )
    group.add_argument("--timezone", help="the schedule's time zone, e.g. Europe/Berlin")
    group.add_argument(
        "--no-guard",
        dest="guard",
        action="store_false",
        default=None,
        help="never pause for battery, heat or hours (servers)",
    )


def prepare_node(settings: NodeSettings) -> tuple[NodeSettings, DeviceGuard | None]:
    """The settings with the saved registration filled in, and the guard to run with."""
    try:
        settings = apply_registration(settings)
        return settings, guard_from_settings(settings)
    except ValueError as exc:
        raise ProviderCommandError(f"bad device guard setting: {exc}", exit_code=2) from None
    except RegistrationError as exc:
        raise ProviderCommandError(str(exc), exit_code=2) from None
