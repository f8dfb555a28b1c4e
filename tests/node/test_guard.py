"""The device guard: the pause rules as tables, the schedule across zones and DST, the
sensor readers (Termux JSON, psutil) and the running guard."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections import namedtuple
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest

from swarmgate.node import guard as guard_module
from swarmgate.node.guard import (
    RUNNING,
    DeviceGuard,
    FixedSensors,
    GuardPolicy,
    PauseDecision,
    Readings,
    ScriptedSensors,
    SystemSensors,
    decide,
    hottest_cpu_temperature,
    parse_schedule,
    parse_termux_battery,
    read_psutil,
    read_termux_battery,
)

NOON = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
HOT = PauseDecision(True, "temperature 50.0 °C", frozenset({"temperature"}))
LOW = PauseDecision(True, "battery 10% and not charging", frozenset({"battery"}))


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# -- decide(): the rules --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("readings", "policy", "previous", "reason"),
    [
        # nothing known: never a pause
        (Readings(), {}, None, None),
        (Readings(cpu_percent=100.0), {}, None, None),
        # battery
        (Readings(battery_percent=14, charging=False), {}, None, "battery 14% and not charging"),
        (Readings(battery_percent=14, charging=True), {}, None, None),
        (Readings(battery_percent=14, charging=None), {}, None, None),  # unknown plug
        (Readings(battery_percent=20, charging=False), {}, None, None),  # at the limit: serve
        (
            Readings(battery_percent=19.96, charging=False),
            {},
            None,
            "battery 19.9% and not charging",  # never rounds up to the limit
        ),
        (Readings(battery_percent=0, charging=False), {}, None, "battery 0% and not charging"),
        (Readings(battery_percent=10, charging=False), {"min_battery_percent": 5}, None, None),
        (Readings(battery_percent=0, charging=False), {"min_battery_percent": 0}, None, None),
        (
            Readings(battery_percent=49.5, charging=False),
            {"min_battery_percent": 50},
            None,
            "battery 49.5% and not charging",
        ),
        (Readings(battery_percent=None, charging=False), {}, None, None),
        # temperature; an unknown source gets the battery limit (45 °C)
        (Readings(temperature_c=51.2), {}, None, "temperature 51.2 °C"),
        (Readings(temperature_c=45.0), {}, None, None),  # at the limit: serve
        (Readings(temperature_c=45.04), {}, None, "temperature 45.0 °C"),
        (Readings(temperature_c=46, temperature_source="battery"), {}, None, "temperature 46.0 °C"),
        (Readings(temperature_c=70, temperature_source="cpu"), {}, None, None),  # CPU: 85 °C
        (Readings(temperature_c=85, temperature_source="cpu"), {}, None, None),
        (Readings(temperature_c=85.5, temperature_source="cpu"), {}, None, "temperature 85.5 °C"),
        (
            Readings(temperature_c=50, temperature_source="battery"),
            {"max_temperature_c": 55},
            None,
            None,
        ),
        # an explicit limit applies whatever the sensor
        (
            Readings(temperature_c=60, temperature_source="cpu"),
            {"max_temperature_c": 55},
            None,
            "temperature 60.0 °C",
        ),
        (Readings(temperature_c=-5.0), {}, None, None),
        # hysteresis: once hot, stay paused until 3 °C under the limit
        (Readings(temperature_c=44.0), {}, HOT, "temperature 44.0 °C"),
        (Readings(temperature_c=42.0), {}, HOT, "temperature 42.0 °C"),  # exactly 45 - 3
        (Readings(temperature_c=41.9), {}, HOT, None),
        (Readings(temperature_c=44.0), {"temperature_hysteresis_c": 0}, HOT, None),
        (Readings(temperature_c=83.0, temperature_source="cpu"), {}, HOT, "temperature 83.0 °C"),
        (Readings(temperature_c=81.9, temperature_source="cpu"), {}, HOT, None),
        (Readings(temperature_c=44.0), {}, LOW, None),  # paused, but not for heat
        (Readings(temperature_c=44.0), {}, RUNNING, None),
        (Readings(temperature_c=None), {}, HOT, None),  # the sensor went away: unknown
        # charging-only mode
        (
            Readings(charging=False),
            {"charging_only": True},
            None,
            "charging-only mode, not charging",
        ),
        (Readings(charging=True), {"charging_only": True}, None, None),
        (Readings(charging=None), {"charging_only": True}, None, None),
        (Readings(battery_percent=90, charging=False), {"charging_only": False}, None, None),
        # several at once, in a fixed order
        (
            Readings(battery_percent=10, charging=False, temperature_c=50),
            {"charging_only": True},
            None,
            "battery 10% and not charging; temperature 50.0 °C; charging-only mode, not charging",
        ),
        (
            Readings(battery_percent=10, charging=False),
            {"schedule": "22:00-07:00", "timezone": "UTC"},
            None,
            "battery 10% and not charging; outside scheduled hours 22:00-07:00",
        ),
        # the schedule (NOON is 12:00 UTC)
        (
            Readings(),
            {"schedule": "22:00-07:00", "timezone": "UTC"},
            None,
            "outside scheduled hours 22:00-07:00",
        ),
        (Readings(), {"schedule": "09:00-17:00", "timezone": "UTC"}, None, None),
        (
            Readings(),
            {"schedule": "22:00-7:00, 13:00-14:00", "timezone": "UTC"},
            None,
            "outside scheduled hours 22:00-07:00, 13:00-14:00",
        ),
    ],
)
def test_decide(
    readings: Readings,
    policy: dict[str, Any],
    previous: PauseDecision | None,
    reason: str | None,
) -> None:
    decision = decide(readings, GuardPolicy(**policy), NOON, previous)
    assert decision.reason == reason
    assert decision.paused is (reason is not None)
    assert bool(decision.causes) is decision.paused


def test_decide_names_its_causes() -> None:
    readings = Readings(battery_percent=5, charging=False, temperature_c=60)
    decision = decide(
        readings, GuardPolicy(charging_only=True, schedule="00:00-01:00", timezone="UTC"), NOON
    )
    assert decision.causes == {"battery", "temperature", "charging", "schedule"}
    assert decide(Readings(), GuardPolicy(), NOON) is RUNNING


@pytest.mark.parametrize("temperature", [45.5, 46, 50, 45, 44, 43, 42.5, 42, 41.99, 41.5, 30])
def test_hysteresis_never_flaps_inside_the_band(temperature: float) -> None:
    """Walking the temperature up and down: inside [limit - 3, limit] the decision keeps
    whatever it was before."""
    policy = GuardPolicy()
    paused = decide(Readings(temperature_c=temperature), policy, NOON, HOT).paused
    running = decide(Readings(temperature_c=temperature), policy, NOON, RUNNING).paused
    if 42 <= temperature <= 45:
        assert (paused, running) == (True, False)
    else:
        assert paused == running == (temperature > 45)


# -- the schedule ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("schedule", "zone", "now", "inside"),
    [
        # crossing midnight
        ("22:00-07:00", "UTC", "2026-06-01T21:59", False),
        ("22:00-07:00", "UTC", "2026-06-01T22:00", True),
        ("22:00-07:00", "UTC", "2026-06-01T23:59", True),
        ("22:00-07:00", "UTC", "2026-06-02T00:00", True),
        ("22:00-07:00", "UTC", "2026-06-02T06:59:59", True),
        ("22:00-07:00", "UTC", "2026-06-02T07:00", False),
        ("22:00-07:00", "UTC", "2026-06-02T12:00", False),
        # the same day
        ("09:00-17:00", "UTC", "2026-06-01T08:59", False),
        ("09:00-17:00", "UTC", "2026-06-01T09:00", True),
        ("09:00-17:00", "UTC", "2026-06-01T16:59", True),
        ("09:00-17:00", "UTC", "2026-06-01T17:00", False),
        # several windows
        ("22:00-07:00,12:00-13:00", "UTC", "2026-06-01T12:30", True),
        ("22:00-07:00,12:00-13:00", "UTC", "2026-06-01T13:00", False),
        ("22:00-07:00,12:00-13:00", "UTC", "2026-06-01T03:00", True),
        ("08:00-10:00, 09:00-11:00", "UTC", "2026-06-01T10:30", True),  # overlapping
        # all day, and up to midnight
        ("00:00-24:00", "UTC", "2026-06-01T00:00", True),
        ("00:00-24:00", "UTC", "2026-06-01T23:59", True),
        ("08:00-24:00", "UTC", "2026-06-01T23:59", True),
        ("08:00-24:00", "UTC", "2026-06-02T00:00", False),
        ("08:00-24:00", "UTC", "2026-06-02T07:59", False),
        ("00:00-06:00", "UTC", "2026-06-01T00:00", True),
        ("23:59-00:01", "UTC", "2026-06-01T00:00", True),
        ("23:59-00:01", "UTC", "2026-06-01T00:01", False),
        # the owner's zone, not UTC: India is UTC+05:30
        ("22:00-07:00", "Asia/Kolkata", "2026-06-01T16:29", False),  # 21:59 IST
        ("22:00-07:00", "Asia/Kolkata", "2026-06-01T16:30", True),  # 22:00 IST
        ("22:00-07:00", "Asia/Kolkata", "2026-06-02T01:29", True),  # 06:59 IST
        ("22:00-07:00", "Asia/Kolkata", "2026-06-02T01:30", False),  # 07:00 IST
        # Chatham Islands, +13:45 in January
        ("22:00-07:00", "Pacific/Chatham", "2026-01-15T08:14", False),
        ("22:00-07:00", "Pacific/Chatham", "2026-01-15T08:15", True),
        # New York: the same wall-clock hours in winter (EST) and summer (EDT)
        ("09:00-17:00", "America/New_York", "2026-01-15T13:59", False),
        ("09:00-17:00", "America/New_York", "2026-01-15T14:00", True),
        ("09:00-17:00", "America/New_York", "2026-07-15T13:00", True),
        ("09:00-17:00", "America/New_York", "2026-07-15T20:59", True),
        ("09:00-17:00", "America/New_York", "2026-07-15T21:00", False),
        # Berlin springs forward on 2026-03-29 at 01:00 UTC (02:00 CET → 03:00 CEST)
        ("01:00-03:00", "Europe/Berlin", "2026-03-29T00:30", True),  # 01:30 CET
        ("01:00-03:00", "Europe/Berlin", "2026-03-29T00:59", True),  # 01:59 CET
        ("01:00-03:00", "Europe/Berlin", "2026-03-29T01:00", False),  # 03:00 CEST
        ("02:00-02:30", "Europe/Berlin", "2026-03-29T00:59", False),  # the hour that never is
        ("02:00-02:30", "Europe/Berlin", "2026-03-29T01:00", False),
        ("22:00-07:00", "Europe/Berlin", "2026-03-29T04:59", True),  # 06:59 CEST
        ("22:00-07:00", "Europe/Berlin", "2026-03-29T05:00", False),  # 07:00 CEST
        # ...and falls back on 2026-10-25 at 01:00 UTC (03:00 CEST → 02:00 CET)
        ("02:00-03:00", "Europe/Berlin", "2026-10-25T00:00", True),  # 02:00 CEST
        ("02:00-03:00", "Europe/Berlin", "2026-10-25T00:59", True),  # 02:59 CEST
        ("02:00-03:00", "Europe/Berlin", "2026-10-25T01:00", True),  # 02:00 CET, again
        ("02:00-03:00", "Europe/Berlin", "2026-10-25T01:59", True),  # 02:59 CET
        ("02:00-03:00", "Europe/Berlin", "2026-10-25T02:00", False),  # 03:00 CET
        ("22:00-07:00", "Europe/Berlin", "2026-10-25T05:59", True),  # 06:59 CET
        ("22:00-07:00", "Europe/Berlin", "2026-10-25T06:00", False),  # 07:00 CET
        # Sydney: southern-hemisphere DST starts 2026-10-04 (AEST +10 → AEDT +11)
        ("22:00-07:00", "Australia/Sydney", "2026-10-03T11:59", False),  # 21:59 AEST
        ("22:00-07:00", "Australia/Sydney", "2026-10-03T12:00", True),  # 22:00 AEST
        ("22:00-07:00", "Australia/Sydney", "2026-10-04T19:59", True),  # 06:59 AEDT, 5 Oct
        ("22:00-07:00", "Australia/Sydney", "2026-10-04T20:00", False),  # 07:00 AEDT
    ],
)
def test_schedule(schedule: str, zone: str, now: str, inside: bool) -> None:
    policy = GuardPolicy(schedule=schedule, timezone=zone)
    assert policy.in_schedule(utc(now)) is inside
    decision = decide(Readings(), policy, utc(now))
    assert decision.paused is not inside
    if not inside:
        assert decision.reason == f"outside scheduled hours {policy.schedule_text}"


@pytest.mark.parametrize("offset_hours", [-11, -3.5, 0, 5.5, 14])
def test_the_schedule_does_not_depend_on_the_zone_now_is_given_in(offset_hours: float) -> None:
    policy = GuardPolicy(schedule="22:00-07:00", timezone="Europe/Berlin")
    start = utc("2026-03-28T12:00")
    zone = timezone(timedelta(hours=offset_hours))
    for minutes in range(0, 48 * 60, 17):
        moment = start + timedelta(minutes=minutes)
        assert policy.in_schedule(moment) is policy.in_schedule(moment.astimezone(zone))


def test_a_whole_dst_day_in_minutes_matches_the_wall_clock() -> None:
    """Every minute across both 2026 Berlin transitions: inside iff 22:00 <= local < 07:00."""
    policy = GuardPolicy(schedule="22:00-07:00", timezone="Europe/Berlin")
    for day in ("2026-03-28T00:00", "2026-10-24T00:00"):
        start = utc(day)
        for minutes in range(0, 3 * 24 * 60, 7):
            moment = start + timedelta(minutes=minutes)
            local = moment.astimezone(policy.tz)
            expected = local.hour >= 22 or local.hour < 7
            assert policy.in_schedule(moment) is expected, moment


def test_no_timezone_means_the_local_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    if not hasattr(time, "tzset"):
        pytest.skip("needs time.tzset")
    monkeypatch.setenv("TZ", "Asia/Tokyo")  # UTC+9, no DST
    time.tzset()
    try:
        policy = GuardPolicy(schedule="22:00-07:00")
        assert policy.in_schedule(utc("2026-06-01T13:00")) is True  # 22:00 in Tokyo
        assert policy.in_schedule(utc("2026-06-01T12:59")) is False
        assert policy.in_schedule(utc("2026-06-01T22:00")) is False  # 07:00 in Tokyo
    finally:
        monkeypatch.undo()
        time.tzset()


def test_a_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        decide(Readings(), GuardPolicy(schedule="22:00-07:00"), datetime(2026, 6, 1, 12))
    # Without a schedule the clock does not matter.
    assert decide(Readings(), GuardPolicy(), datetime(2026, 6, 1, 12)) is RUNNING


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("", ""),
        ("   ", ""),
        ("22:00-07:00", "22:00-07:00"),
        ("7:00-9:30", "07:00-09:30"),
        (" 22:00 - 07:00 , 12:00-13:00 ", "22:00-07:00, 12:00-13:00"),
        ("00:00-24:00", "00:00-24:00"),
        ("23:59-00:00", "23:59-00:00"),
    ],
)
def test_parse_schedule(text: str, normalised: str) -> None:
    assert ", ".join(str(w) for w in parse_schedule(text)) == normalised


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("22:00", "not a time window"),
        ("22-07", "not a time window"),
        ("22:00-07:00,", "not a time window"),
        (",22:00-07:00", "not a time window"),
        ("22:00-07:00;12:00-13:00", "not a time window"),
        ("10pm-7am", "not a time window"),
        ("22:00-07:000", "not a time window"),
        ("25:00-07:00", "not a time of day"),
        ("22:00-07:60", "not a time of day"),
        ("24:00-07:00", "not a time of day"),
        ("22:00-24:30", "not a time of day"),
        ("22:00-25:00", "not a time of day"),
        ("07:00-07:00", "same time"),
        ("00:00-00:00", "same time"),
        ("24:00-00:00", "not a time of day"),
    ],
)
def test_parse_schedule_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_schedule(text)


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ({"min_battery_percent": -1}, "battery"),
        ({"min_battery_percent": 101}, "battery"),
        ({"max_temperature_c": float("nan")}, "temperature"),
        ({"max_temperature_c": float("inf")}, "temperature"),
        ({"temperature_hysteresis_c": -1}, "hysteresis"),
        ({"timezone": "Mars/Olympus_Mons"}, "unknown time zone"),
        ({"timezone": "../../etc/passwd"}, "unknown time zone"),
        ({"timezone": "UTC+5"}, "unknown time zone"),
        ({"schedule": "later"}, "not a time window"),
    ],
)
def test_bad_policies_are_refused(policy: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GuardPolicy(**policy)


# -- termux-battery-status ------------------------------------------------------------------
# Captured from termux-api 0.50 (Android 11) and 0.59 (Android 14).
TERMUX_OLD = b"""{
  "health": "GOOD",
  "percentage": 87,
  "plugged": "UNPLUGGED",
  "status": "DISCHARGING",
  "temperature": 29.899999618530273,
  "current": -312000
}
"""
TERMUX_NEW = b"""{
  "present": true,
  "technology": "Li-poly",
  "health": "GOOD",
  "plugged": "PLUGGED_AC",
  "status": "CHARGING",
  "temperature": 33.0,
  "voltage": 4168,
  "current": 1520000,
  "current_average": 1480000,
  "percentage": 64,
  "level": 64,
  "scale": 100,
  "charge_counter": 2870000,
  "energy": null,
  "cycle": 132
}
"""


def termux(**fields: Any) -> bytes:
    return orjson.dumps(fields)


@pytest.mark.parametrize(
    ("output", "battery", "charging", "temperature"),
    [
        (TERMUX_OLD, 87.0, False, 29.899999618530273),
        (TERMUX_NEW, 64.0, True, 33.0),
        (TERMUX_NEW.decode(), 64.0, True, 33.0),
        (termux(percentage=100, plugged="PLUGGED_USB", status="FULL"), 100.0, True, None),
        (termux(percentage=50, plugged="PLUGGED_WIRELESS"), 50.0, True, None),
        (termux(percentage=50, plugged="PLUGGED_8"), 50.0, True, None),  # a dock
        (termux(percentage=50, plugged="UNPLUGGED", status="CHARGING"), 50.0, False, None),
        # no plug field: the status decides where it can
        (termux(percentage=50, status="CHARGING"), 50.0, True, None),
        (termux(percentage=50, status="FULL"), 50.0, True, None),
        (termux(percentage=50, status="DISCHARGING"), 50.0, False, None),
        (termux(percentage=50, status="NOT_CHARGING"), 50.0, None, None),
        (termux(percentage=50, status="UNKNOWN"), 50.0, None, None),
        (termux(percentage=50, plugged=None, status=None), 50.0, None, None),
        (termux(percentage=50, plugged=3), 50.0, None, None),
        (termux(percentage=0.5), 0.5, None, None),
        (termux(percentage=0), 0.0, None, None),
        # values that are not values
        (termux(percentage="87"), None, None, None),
        (termux(percentage=True), None, None, None),
        (termux(percentage=150), None, None, None),
        (termux(percentage=-1), None, None, None),
        (termux(percentage=None, temperature=None), None, None, None),
        (termux(temperature="hot"), None, None, None),
        (termux(temperature=-273.15), None, None, None),
        (termux(temperature=999), None, None, None),
        (b'{"percentage": 87, "temperature": NaN}', None, None, None),  # not JSON
        (b'{"percentage": 87, "temperature": 1e999}', None, None, None),
        # not JSON at all, or not an object
        (b"", None, None, None),
        (b"   ", None, None, None),
        (b"{", None, None, None),
        (b'{"percentage": 87, "plugged"', None, None, None),  # cut off
        (b"null", None, None, None),
        (b"[87]", None, None, None),
        (b'"87"', None, None, None),
        (b"87", None, None, None),
        (b"Error: Termux:API is not installed\n", None, None, None),
        (b"\xff\xfe{}", None, None, None),
        (TERMUX_OLD + TERMUX_OLD, None, None, None),  # two objects
    ],
)
def test_parse_termux_battery(
    output: bytes | str, battery: float | None, charging: bool | None, temperature: float | None
) -> None:
    readings = parse_termux_battery(output)
    assert readings.battery_percent == battery
    assert readings.charging is charging
    assert readings.temperature_c == temperature
    assert readings.temperature_source == ("battery" if temperature is not None else None)
    assert readings.cpu_percent is None


def _python(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


async def test_read_termux_battery_runs_the_command() -> None:
    code = f"import sys; sys.stdout.write({TERMUX_NEW.decode()!r})"
    readings = await read_termux_battery(_python(code), timeout_s=10)
    assert readings == Readings(
        battery_percent=64.0, charging=True, temperature_c=33.0, temperature_source="battery"
    )


@pytest.mark.parametrize(
    "command",
    [
        _python("import sys; print('{\"percentage\": 50}'); sys.exit(1)"),  # failed
        _python("print('not json')"),
        _python("pass"),  # no output
        ("/nonexistent/termux-battery-status",),
    ],
)
async def test_read_termux_battery_failures_are_unknown(command: tuple[str, ...]) -> None:
    assert await read_termux_battery(command, timeout_s=10) == Readings()


async def test_read_termux_battery_gives_up_on_a_hang_and_kills_it(tmp_path: Path) -> None:
    """Without the Termux:API app the command never answers. The real one is a shell
    script around a helper, so the helper holding stdout must die too."""
    pid_file = tmp_path / "child.pid"
    script = tmp_path / "termux-battery-status"
    script.write_text(f"#!/bin/sh\nsleep 30 &\necho $! > {pid_file}\nwait\n")
    script.chmod(0o755)
    started = time.monotonic()
    readings = await read_termux_battery((str(script),), timeout_s=0.5)
    assert readings == Readings()
    assert time.monotonic() - started < 5
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _alive(child):
        assert time.monotonic() < deadline, "the helper outlived the timeout"
        await asyncio.sleep(0.02)


def _alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie waiting for whoever reaps orphans here."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# -- psutil -----------------------------------------------------------------------------------
Temp = namedtuple("Temp", "label current high critical")


def t(label: str, current: float | None) -> Temp:
    return Temp(label, current, None, None)


@pytest.mark.parametrize(
    ("sensors", "expected"),
    [
        ({}, None),
        ({"coretemp": [t("Package id 0", 55.0), t("Core 0", 52.0), t("Core 1", 61.0)]}, 61.0),
        ({"k10temp": [t("Tctl", 70.5), t("Tccd1", 65.0)]}, 70.5),
        ({"zenpower": [t("Tdie", 66.0)]}, 66.0),
        ({"cpu_thermal": [t("", 48.7)]}, 48.7),  # Raspberry Pi
        ({"cpu-thermal": [t("", 51.0)]}, 51.0),
        ({"soc_thermal": [t("", 55.0)], "gpu_thermal": [t("", 70.0)]}, 55.0),  # Rockchip
        ({"nvme": [t("Composite", 80.0)], "coretemp": [t("Core 0", 50.0)]}, 50.0),
        ({"amdgpu": [t("edge", 90.0)]}, None),
        ({"acpitz": [t("", 40.0)]}, None),  # a board zone, not the CPU
        ({"iwlwifi_1": [t("", 45.0)]}, None),
        ({"coretemp": [t("Core 0", None), t("Core 1", 47.0)]}, 47.0),
        ({"coretemp": [t("Core 0", -273.0), t("Core 1", 255.0)]}, None),  # broken sensors
        ({"coretemp": [t("Core 0", float("nan"))]}, None),
        ({"coretemp": []}, None),
    ],
)
def test_hottest_cpu_temperature(sensors: dict[str, list[Temp]], expected: float | None) -> None:
    assert hottest_cpu_temperature(sensors) == expected


Battery = namedtuple("Battery", "percent secsleft power_plugged")


def test_read_psutil_reads_battery_and_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guard_module.psutil, "sensors_battery", lambda: Battery(42.5, 3600, False))
    monkeypatch.setattr(
        guard_module.psutil, "sensors_temperatures", lambda: {"cpu_thermal": [t("", 57.3)]}
    )
    monkeypatch.setattr(guard_module.psutil, "cpu_percent", lambda interval=None: 12.5)
    assert read_psutil() == Readings(
        battery_percent=42.5,
        charging=False,
        temperature_c=57.3,
        cpu_percent=12.5,
        temperature_source="cpu",
    )


def test_read_psutil_survives_every_sensor_failing(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise OSError("no /sys here")

    for name in ("sensors_battery", "sensors_temperatures", "cpu_percent"):
        monkeypatch.setattr(guard_module.psutil, name, broken)
    assert read_psutil() == Readings()


def test_read_psutil_without_a_battery_or_plug_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guard_module.psutil, "sensors_battery", lambda: None)
    monkeypatch.delattr(guard_module.psutil, "sensors_temperatures", raising=False)
    assert read_psutil().battery_percent is None
    monkeypatch.setattr(guard_module.psutil, "sensors_battery", lambda: Battery(80.0, -1, None))
    readings = read_psutil()
    assert (readings.battery_percent, readings.charging, readings.temperature_c) == (
        80.0,
        None,
        None,
    )


async def test_system_sensors_prefer_termux_for_the_battery(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    desktop = Readings(
        battery_percent=None, temperature_c=70.0, cpu_percent=33.0, temperature_source="cpu"
    )
    monkeypatch.setattr(guard_module, "read_psutil", lambda: desktop)
    code = f"import sys; sys.stdout.write({TERMUX_OLD.decode()!r})"
    readings = await SystemSensors(termux_command=_python(code)).read()
    assert readings == Readings(
        battery_percent=87.0,
        charging=False,
        temperature_c=29.899999618530273,
        cpu_percent=33.0,
        temperature_source="battery",
    )
    # Termux silent: psutil's readings stand.
    assert await SystemSensors(termux_command=_python("pass")).read() == desktop
    assert await SystemSensors(termux_command=()).read() == desktop


async def test_system_sensors_on_this_machine_do_not_raise() -> None:
    readings = await SystemSensors().read()
    assert isinstance(readings, Readings)


# -- the running guard ------------------------------------------------------------------------
async def test_device_guard_follows_the_readings_and_flags_changes() -> None:
    sensors = ScriptedSensors(
        [
            Readings(battery_percent=80, charging=False),
            Readings(battery_percent=15, charging=False),  # pause
            Readings(battery_percent=14, charging=False),  # same rule: no change
            Readings(battery_percent=14, charging=False, temperature_c=50),  # a second rule
            Readings(battery_percent=14, charging=True, temperature_c=43),  # still cooling
            Readings(battery_percent=14, charging=True, temperature_c=41),  # resume
        ]
    )
    guard = DeviceGuard(sensors, GuardPolicy(), interval_s=60, clock=lambda: NOON)
    assert not guard.paused and guard.reason is None
    expected = [
        (False, None, False),
        (True, "battery 15% and not charging", True),
        (True, "battery 14% and not charging", False),
        (True, "battery 14% and not charging; temperature 50.0 °C", True),
        (True, "temperature 43.0 °C", True),
        (False, None, True),
    ]
    for paused, reason, changed in expected:
        guard.changed.clear()
        decision = await guard.check()
        assert (decision.paused, decision.reason) == (paused, reason)
        assert (guard.paused, guard.reason) == (paused, reason)
        assert guard.changed.is_set() is changed, reason
        assert guard.readings == sensors.script[guard.checks - 1]
    assert guard.checks == len(expected)


async def test_device_guard_treats_a_failing_sensor_as_unknown(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken:
        async def read(self) -> Readings:
            raise RuntimeError("sensor on fire")

    guard = DeviceGuard(Broken(), GuardPolicy(), clock=lambda: NOON)
    with caplog.at_level(logging.WARNING, logger="swarmgate.node.guard"):
        assert await guard.check() is RUNNING
        assert await guard.check() is RUNNING
    assert [r.message for r in caplog.records].count(
        "reading the device sensors failed; treating as unknown"
    ) == 1


async def test_device_guard_warns_once_when_charging_only_cannot_work(
    caplog: pytest.LogCaptureFixture,
) -> None:
    guard = DeviceGuard(FixedSensors(), GuardPolicy(charging_only=True), clock=lambda: NOON)
    with caplog.at_level(logging.WARNING, logger="swarmgate.node.guard"):
        for _ in range(3):
            assert not (await guard.check()).paused
    warnings = [r for r in caplog.records if "charging-only" in r.message]
    assert len(warnings) == 1


async def test_device_guard_run_keeps_checking() -> None:
    sensors = FixedSensors(Readings(battery_percent=80, charging=False))
    guard = DeviceGuard(sensors, GuardPolicy(), interval_s=0.01)
    task = asyncio.create_task(guard.run())
    try:
        while guard.checks < 3:
            await asyncio.sleep(0.005)
        assert not guard.paused
        sensors.update(battery_percent=5.0)
        await asyncio.wait_for(guard.changed.wait(), 2)
        assert guard.reason == "battery 5% and not charging"
        assert guard.readings.battery_percent == 5.0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_scripted_sensors_repeat_the_last_reading() -> None:
    sensors = ScriptedSensors([Readings(cpu_percent=1.0), Readings(cpu_percent=2.0)])
    assert [(await sensors.read()).cpu_percent for _ in range(4)] == [1.0, 2.0, 2.0, 2.0]
    with pytest.raises(ValueError, match="at least one"):
        ScriptedSensors([])
