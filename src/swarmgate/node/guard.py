"""The device guard: pauses a node when serving would hurt the device or its owner.

Three parts, IO kept apart from the rules:

    Sensors        read()  -> Readings          (psutil, termux-battery-status, or a fake)
    decide()       Readings + GuardPolicy + now -> PauseDecision      (pure)
    DeviceGuard    reads the sensors every few seconds and keeps the current decision

The rules: pause when the battery is below ``min_battery_percent`` and not charging; when
the temperature is above the limit (and stay paused until it is ``temperature_hysteresis_c``
below it, so the node does not flap); in charging-only mode when not charging; outside the
scheduled hours. A reading that is unknown (None) never causes a pause.

Temperature limits. Phones report their *battery* temperature (Termux); Linux boards and
PCs report their *CPU* temperature (psutil). The two live in different ranges, so unless a
limit is given explicitly the guard uses one per source:

* battery: 45 °C. Lithium-ion cells are specified for charging between 0 and 45 °C and
  Android itself starts to throttle and stop charging around there. An unknown source is
  treated as a battery (the stricter limit).
* CPU: 85 °C. A Raspberry Pi's firmware throttles from 80-85 °C, and desktop CPUs run near
  90 °C under a full inference load; above 85 °C the node stops taking new jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import re
import shutil
import signal
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
import psutil

if TYPE_CHECKING:
    from swarmgate.config import NodeSettings

log = logging.getLogger("swarmgate.node.guard")

BATTERY_TEMPERATURE_LIMIT_C = 45.0
CPU_TEMPERATURE_LIMIT_C = 85.0
TEMPERATURE_HYSTERESIS_C = 3.0
TERMUX_BATTERY_COMMAND = "termux-battery-status"
# termux-battery-status blocks for ever when the Termux:API app is not installed.
TERMUX_TIMEOUT_S = 5.0

TemperatureSource = Literal["battery", "cpu"]
_T = TypeVar("_T")


# -- readings and sensors ------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Readings:
    """What the device says about itself; None where it cannot tell."""

    battery_percent: float | None = None
    charging: bool | None = None  # on external power (charging, or full and plugged in)
    temperature_c: float | None = None
    cpu_percent: float | None = None
    temperature_source: TemperatureSource | None = None


class Sensors(Protocol):
    async def read(self) -> Readings:
        """Current readings. Never raises: what cannot be read is None."""
        ...


class FixedSensors:
    """A fake for tests and demos: returns ``readings`` until they are changed."""

    def __init__(self, readings: Readings | None = None) -> None:
        self.readings = readings or Readings()
        self.reads = 0

    def update(self, **changes: Any) -> None:
        self.readings = dataclasses.replace(self.readings, **changes)

    async def read(self) -> Readings:
        self.reads += 1
        return self.readings


class ScriptedSensors:
    """A fake that plays readings in order, then keeps returning the last one."""

    def __init__(self, script: Iterable[Readings]) -> None:
        self.script = list(script)
        if not self.script:
            raise ValueError("a sensor script needs at least one reading")
        self.reads = 0

    async def read(self) -> Readings:
        readings = self.script[min(self.reads, len(self.script) - 1)]
        self.reads += 1
        return readings


def _finite(value: object, low: float, high: float) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    if not math.isfinite(number) or not low <= number <= high:
        return None
    return number


def _termux_charging(plugged: object, status: object) -> bool | None:
    # Termux:API names the plug "UNPLUGGED", "PLUGGED_AC", "PLUGGED_USB", "PLUGGED_WIRELESS"
    # or "PLUGGED_<n>"; the status is a fallback for builds that do not report it.
    if plugged == "UNPLUGGED":
        return False
    if isinstance(plugged, str) and plugged.startswith("PLUGGED"):
        return True
    if status in ("CHARGING", "FULL"):
        return True
    if status == "DISCHARGING":
        return False
    return None  # NOT_CHARGING can mean plugged in but held back; UNKNOWN is unknown


def parse_termux_battery(output: str | bytes) -> Readings:
    """Readings from ``termux-battery-status`` JSON; anything unusable is None."""
    try:
        data = orjson.loads(output)
    except orjson.JSONDecodeError:
        return Readings()
    if not isinstance(data, dict):
        return Readings()
    temperature = _finite(data.get("temperature"), -40.0, 150.0)
    return Readings(
        battery_percent=_finite(data.get("percentage"), 0.0, 100.0),
        charging=_termux_charging(data.get("plugged"), data.get("status")),
        temperature_c=temperature,
        temperature_source="battery" if temperature is not None else None,
    )


def _kill(process: asyncio.subprocess.Process) -> None:
    # The command is a shell script around a helper binary: kill its whole process group.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if hasattr(os, "killpg"):
            os.killpg(process.pid, signal.SIGKILL)
        else:  # pragma: no cover - Termux is never Windows
            process.kill()


async def read_termux_battery(
    command: Sequence[str] = (TERMUX_BATTERY_COMMAND,), timeout_s: float = TERMUX_TIMEOUT_S
) -> Readings:
    """Runs ``termux-battery-status`` (Android under Termux, with the Termux:API app)."""
    try:
        process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
    except OSError as exc:
        log.debug("cannot run %s: %s", command[0], exc)
        return Readings()
    try:
        stdout, _ = await asyncio.wait_for(process.communicate(), timeout_s)
    except TimeoutError:
        log.warning(
            "%s did not answer in %g s (is the Termux:API app installed?)",
            command[0],
            timeout_s,
        )
        return Readings()
    finally:
        if process.returncode is None:
            _kill(process)
            await process.wait()
    if process.returncode != 0:
        return Readings()
    return parse_termux_battery(stdout)


# Chip or label names that mean "the CPU" (x86, AMD, Raspberry Pi, Rockchip, phone SoCs).
_CPU_WORDS = ("cpu", "core", "k10temp", "zenpower", "soc", "package", "tctl", "tdie")


def hottest_cpu_temperature(sensors: Mapping[str, Iterable[Any]]) -> float | None:
    """The hottest CPU-ish reading from ``psutil.sensors_temperatures()``."""
    hottest: float | None = None
    for chip, entries in sensors.items():
        for entry in entries:
            name = f"{chip} {getattr(entry, 'label', '') or ''}".lower()
            if not any(word in name for word in _CPU_WORDS):
                continue
            value = _finite(getattr(entry, "current", None), -30.0, 150.0)
            if value is not None and (hottest is None or value > hottest):
                hottest = value
    return hottest


def read_psutil() -> Readings:
    """Battery, CPU temperature and CPU load from psutil (blocking: reads /sys)."""
    battery: float | None = None
    charging: bool | None = None
    temperature: float | None = None
    with contextlib.suppress(Exception):
        state = psutil.sensors_battery() if hasattr(psutil, "sensors_battery") else None
        if state is not None:
            battery = _finite(state.percent, 0.0, 100.0)
            charging = state.power_plugged if isinstance(state.power_plugged, bool) else None
    with contextlib.suppress(Exception):
        if hasattr(psutil, "sensors_temperatures"):
            temperature = hottest_cpu_temperature(psutil.sensors_temperatures())
    cpu: float | None = None
    with contextlib.suppress(Exception):
        cpu = _finite(psutil.cpu_percent(interval=None), 0.0, 100.0)
    return Readings(
        battery_percent=battery,
        charging=charging,
        temperature_c=temperature,
        cpu_percent=cpu,
        temperature_source="cpu" if temperature is not None else None,
    )


class SystemSensors:
    """The real device: psutil everywhere, plus ``termux-battery-status`` where it exists.

    On Android psutil usually cannot see the battery or thermal zones, while Termux:API
    reports the battery's charge, plug and temperature; those win when both answer.
    """

    def __init__(
        self,
        termux_command: Sequence[str] | None = None,
        termux_timeout_s: float = TERMUX_TIMEOUT_S,
    ) -> None:
        if termux_command is None:
            found = shutil.which(TERMUX_BATTERY_COMMAND)
            termux_command = (found,) if found else ()
        self.termux_command = tuple(termux_command)
        self.termux_timeout_s = termux_timeout_s
        with contextlib.suppress(Exception):
            psutil.cpu_percent(interval=None)  # the first call only starts the measurement

    async def read(self) -> Readings:
        readings = await asyncio.to_thread(read_psutil)
        if not self.termux_command:
            return readings
        phone = await read_termux_battery(self.termux_command, self.termux_timeout_s)
        return Readings(
            battery_percent=_first(phone.battery_percent, readings.battery_percent),
            charging=_first(phone.charging, readings.charging),
            temperature_c=_first(phone.temperature_c, readings.temperature_c),
            cpu_percent=readings.cpu_percent,
            temperature_source=phone.temperature_source or readings.temperature_source,
        )


def _first(*values: _T | None) -> _T | None:
    return next((v for v in values if v is not None), None)


# -- the schedule --------------------------------------------------------------------------
_WINDOW = re.compile(r"^(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})$")
MINUTES_PER_DAY = 24 * 60


@dataclass(frozen=True, slots=True)
class ScheduleWindow:
    """Serving hours from ``start`` to ``end`` (minutes after midnight, end excluded).
    An end before the start crosses midnight; ``end`` may be 1440 (24:00)."""

    start: int
    end: int

    def contains(self, minute: int) -> bool:
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end

    def __str__(self) -> str:
        return f"{_hhmm(self.start)}-{_hhmm(self.end)}"


def _hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def parse_schedule(text: str) -> tuple[ScheduleWindow, ...]:
    """``"22:00-07:00, 12:00-13:30"`` → windows. An empty string means no schedule."""
    if not text.strip():
        return ()
    windows = []
    for part in text.split(","):
        match = _WINDOW.match(part.strip())
        if match is None:
            raise ValueError(f"not a time window: {part.strip()!r} (expected HH:MM-HH:MM)")
        sh, sm, eh, em = (int(g) for g in match.groups())
        if sh > 23 or sm > 59 or em > 59 or eh > 24 or (eh == 24 and em != 0):
            raise ValueError(f"not a time of day in {part.strip()!r}")
        start, end = sh * 60 + sm, eh * 60 + em
        if start == end:
            raise ValueError(
                f"{part.strip()!r} starts and ends at the same time; use 00:00-24:00 for all day"
            )
        windows.append(ScheduleWindow(start, end))
    return tuple(windows)


def load_timezone(name: str | None) -> ZoneInfo | None:
    """A zoneinfo zone by name; None or "" means the system's local time."""
    if not name:
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r} (use a name like 'Europe/Berlin')") from None


# -- the policy and the decision -----------------------------------------------------------
@dataclass(frozen=True)
class GuardPolicy:
    min_battery_percent: float = 20.0
    # None: 45 °C for a battery reading, 85 °C for a CPU reading (see the module docstring).
    max_temperature_c: float | None = None
    temperature_hysteresis_c: float = TEMPERATURE_HYSTERESIS_C
    charging_only: bool = False
    schedule: str = ""  # "22:00-07:00"; several comma-separated; empty: any time
    timezone: str | None = None  # zoneinfo name; None: local time
    windows: tuple[ScheduleWindow, ...] = field(init=False, repr=False, compare=False)
    tz: ZoneInfo | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 <= self.min_battery_percent <= 100:
            raise ValueError("the minimum battery must be between 0 and 100 %")
        if self.max_temperature_c is not None and not math.isfinite(self.max_temperature_c):
            raise ValueError("the temperature limit must be a number")
        if self.temperature_hysteresis_c < 0:
            raise ValueError("the temperature hysteresis cannot be negative")
        object.__setattr__(self, "windows", parse_schedule(self.schedule))
        object.__setattr__(self, "tz", load_timezone(self.timezone))

    def temperature_limit(self, source: TemperatureSource | None) -> float:
        if self.max_temperature_c is not None:
            return self.max_temperature_c
        return CPU_TEMPERATURE_LIMIT_C if source == "cpu" else BATTERY_TEMPERATURE_LIMIT_C

    def in_schedule(self, now: datetime) -> bool:
        if not self.windows:
            return True
        if now.tzinfo is None:
            raise ValueError("the guard needs an aware datetime")
        # Wall-clock time in the owner's zone: "22:00" means 22:00 on both sides of DST.
        local = now.astimezone(self.tz)
        minute = local.hour * 60 + local.minute
        return any(w.contains(minute) for w in self.windows)

    @property
    def schedule_text(self) -> str:
        return ", ".join(str(w) for w in self.windows)


BATTERY, TEMPERATURE, CHARGING_ONLY, SCHEDULE = "battery", "temperature", "charging", "schedule"


@dataclass(frozen=True)
class PauseDecision:
    paused: bool
    reason: str | None = None
    # Which rules paused the device; the temperature rule needs it for its hysteresis.
    causes: frozenset[str] = frozenset()


RUNNING = PauseDecision(paused=False)


def _percent(value: float) -> str:
    # Rounded down, so a reading just under the limit never reads as the limit itself.
    return f"{math.floor(value * 10) / 10:g}"


def decide(
    readings: Readings,
    policy: GuardPolicy,
    now: datetime,
    previous: PauseDecision | None = None,
) -> PauseDecision:
    """Whether the device should pause now, and why (reasons joined by "; ")."""
    reasons: dict[str, str] = {}
    battery = readings.battery_percent
    if battery is not None and battery < policy.min_battery_percent and readings.charging is False:
        reasons[BATTERY] = f"battery {_percent(battery)}% and not charging"
    temperature = readings.temperature_c
    if temperature is not None:
        limit = policy.temperature_limit(readings.temperature_source)
        cooling = previous is not None and TEMPERATURE in previous.causes
        if temperature > limit or (
            cooling and temperature >= limit - policy.temperature_hysteresis_c
        ):
            reasons[TEMPERATURE] = f"temperature {temperature:.1f} °C"
    if policy.charging_only and readings.charging is False:
        reasons[CHARGING_ONLY] = "charging-only mode, not charging"
    if not policy.in_schedule(now):
        reasons[SCHEDULE] = f"outside scheduled hours {policy.schedule_text}"
    if not reasons:
        return RUNNING
    return PauseDecision(True, "; ".join(reasons.values()), frozenset(reasons))


# -- the running guard ---------------------------------------------------------------------
class DeviceGuard:
    """Reads the sensors every ``interval_s`` and keeps the current decision.

    ``changed`` is set whenever the device pauses, resumes, or pauses for a different
    rule, so the node can tell the gateway at once instead of at its next heartbeat.
    """

    def __init__(
        self,
        sensors: Sensors,
        policy: GuardPolicy | None = None,
        interval_s: float = 15.0,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.sensors = sensors
        self.policy = policy or GuardPolicy()
        self.interval_s = interval_s
        self.readings = Readings()
        self.decision = RUNNING
        self.checks = 0
        self.changed = asyncio.Event()
        self._clock = clock or (lambda: datetime.now(UTC))
        self._warned: set[str] = set()

    @property
    def paused(self) -> bool:
        return self.decision.paused

    @property
    def reason(self) -> str | None:
        return self.decision.reason

    async def check(self) -> PauseDecision:
        """Reads the sensors once and updates the decision."""
        try:
            readings = await self.sensors.read()
        except Exception:
            self._warn_once("sensors", "reading the device sensors failed; treating as unknown")
            readings = Readings()
        self._warn_about_blind_spots(readings)
        decision = decide(readings, self.policy, self._clock(), self.decision)
        previous, self.readings, self.decision = self.decision, readings, decision
        self.checks += 1
        if decision.paused != previous.paused or decision.causes != previous.causes:
            if decision.paused:
                log.info("pausing: %s", decision.reason)
            else:
                log.info("resuming: the device is fit to serve again")
            self.changed.set()
        return decision

    async def run(self) -> None:
        """Checks until cancelled."""
        while True:
            await self.check()
            await asyncio.sleep(self.interval_s)

    def _warn_about_blind_spots(self, readings: Readings) -> None:
        if self.policy.charging_only and readings.charging is None:
            self._warn_once(
                "charging",
                "charging-only mode is on, but this device's charging state cannot be read: "
                "it has no effect",
            )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message)


def policy_from_settings(settings: NodeSettings) -> GuardPolicy:
    """The node's guard policy; ValueError names the setting that is wrong."""
    return GuardPolicy(
        min_battery_percent=settings.min_battery_percent,
        max_temperature_c=settings.max_temperature_c,
        charging_only=settings.charging_only,
        schedule=settings.schedule,
        timezone=settings.timezone or None,
    )


def guard_from_settings(
    settings: NodeSettings, sensors: Sensors | None = None
) -> DeviceGuard | None:
    """The guard ``swarmgate node`` runs with, or None when it is turned off."""
    if not settings.guard:
        return None
    return DeviceGuard(
        sensors or SystemSensors(), policy_from_settings(settings), settings.guard_interval_s
    )
