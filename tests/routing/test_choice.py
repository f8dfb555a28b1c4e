"""Pure choice logic and slot accounting, without sockets."""

from __future__ import annotations

import asyncio

import pytest

from swarmgate.errors import DevicesBusy, ModelWarming
from swarmgate.routing.registry import DeviceConnection, DeviceRegistry, pick_device
from swarmgate.routing.states import ConnectionState


async def _noop(_text: str) -> None:
    return None


def device(
    name: str,
    *,
    slots: int = 1,
    active: int = 0,
    ttft: float | None = None,
    state: ConnectionState = ConnectionState.READY,
    cooldown_until: float = 0.0,
    models: tuple[str, ...] = ("m",),
) -> DeviceConnection:
    conn = DeviceConnection(
        device_id=name,
        account_id="acct",
        region="r",
        slots=slots,
        models=frozenset(models),
        send_text=_noop,
    )
    conn.state = state
    conn.ewma_ttft_ms = ttft
    conn.cooldown_until = cooldown_until
    for i in range(active):
        conn.active[f"{name}.{i}"] = asyncio.Queue()
    return conn


NOW = 1000.0

PICK_CASES = [
    ("empty", [], set(), None),
    ("only one", [device("a")], set(), "a"),
    (
        "least loaded wins",
        [device("a", slots=4, active=3), device("b", slots=4, active=1)],
        set(),
        "b",
    ),
    (
        "load is a fraction of slots",
        [device("a", slots=8, active=2), device("b", slots=2, active=1)],
        set(),
        "a",
    ),
    (
        "full devices are skipped",
        [device("a", active=1), device("b", slots=2, active=1)],
        set(),
        "b",
    ),
    ("faster first token breaks ties", [device("a", ttft=300), device("b", ttft=120)], set(), "b"),
    ("unmeasured devices get tried", [device("a", ttft=50), device("b")], set(), "b"),
    ("excluded devices are skipped", [device("a"), device("b", ttft=900)], {"a"}, "b"),
    (
        "paused devices are skipped",
        [device("a", state=ConnectionState.PAUSED), device("b", ttft=900)],
        set(),
        "b",
    ),
    ("draining devices are skipped", [device("a", state=ConnectionState.DRAINING)], set(), None),
    (
        "cooling devices come last",
        [device("a", cooldown_until=NOW + 5), device("b", ttft=900)],
        set(),
        "b",
    ),
    ("a cooling device beats none", [device("a", cooldown_until=NOW + 5)], set(), "a"),
    (
        "cooldown over",
        [device("a", cooldown_until=NOW - 1, ttft=1), device("b", ttft=2)],
        set(),
        "a",
    ),
]


@pytest.mark.parametrize(
    ("candidates", "exclude", "expected"),
    [pytest.param(c, e, x, id=i) for i, c, e, x in PICK_CASES],
)
def test_pick_device(
    candidates: list[DeviceConnection], exclude: set[str], expected: str | None
) -> None:
    chosen = pick_device(candidates, exclude, now=NOW)
    assert (chosen.device_id if chosen else None) == expected


@pytest.mark.parametrize(
    ("failures", "cooldown"),
    [(1, 2.0), (2, 4.0), (3, 8.0), (5, 32.0), (6, 60.0), (20, 60.0)],
)
def test_cooldown_grows_with_consecutive_failures_and_is_capped(
    failures: int, cooldown: float
) -> None:
    conn = device("a")
    for _ in range(failures):
        conn.observe_failure(NOW)
    assert conn.cooldown_until - NOW == pytest.approx(cooldown)
    conn.observe_success(100.0, 10, 0.5)
    assert conn.cooldown_until == 0 and conn.consecutive_failures == 0
    assert conn.ewma_ttft_ms == 100.0 and conn.ewma_tokens_per_s == pytest.approx(20.0)


def test_occupy_and_vacate_move_between_ready_and_busy() -> None:
    conn = device("a", slots=2)
    conn.occupy("j1", asyncio.Queue())
    assert conn.state is ConnectionState.READY
    conn.occupy("j2", asyncio.Queue())
    assert conn.state is ConnectionState.BUSY and not conn.accepting
    assert conn.vacate("j1") is True
    assert conn.state is ConnectionState.READY
    assert conn.vacate("j1") is False  # twice is harmless
    assert "j1" in conn.recent


async def test_registry_warming_busy_and_wakeup() -> None:
    registry = DeviceRegistry()
    with pytest.raises(ModelWarming):
        await registry.reserve("m", set(), 0.1)
    conn = device("a")
    registry.add(conn)
    got = await registry.reserve("m", set(), 0.1)
    assert got is conn
    conn.occupy("j", asyncio.Queue())
    with pytest.raises(DevicesBusy) as busy:
        await registry.reserve("m", set(), 0.05)
    assert busy.value.retry_after == 1
    waiter = asyncio.create_task(registry.reserve("m", set(), 2.0))
    await asyncio.sleep(0.01)
    conn.vacate("j")
    registry.slot_freed(conn)
    assert await asyncio.wait_for(waiter, 1) is conn
    # Every device excluded: no point waiting.
    assert await registry.reserve("m", {"a"}, 1.0) is None


def test_registry_replaces_a_reconnected_device_and_indexes_by_model() -> None:
    registry = DeviceRegistry()
    old = device("a", models=("m", "n"))
    registry.add(old)
    new = device("a", models=("m",))
    assert registry.add(new) is old
    assert registry.get("a") is new
    assert registry.model_counts() == {"m": 1}
    registry.remove(new)
    assert registry.devices() == [] and not registry.has_model("m")
