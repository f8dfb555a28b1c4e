"""The pure choice of a device (routing/choice.py) and the registry's index, without sockets."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import pytest

from swarmgate.catalog import Pricing
from swarmgate.errors import DevicesBusy, ModelWarming, NoDeviceMatches
from swarmgate.routing.choice import (
    SCAN_LIMIT,
    Busy,
    ModelPool,
    Picked,
    Rejected,
    Route,
    choose,
)
from swarmgate.routing.profile import MEASURED_AFTER, DeviceProfile
from swarmgate.routing.registry import DeviceConnection, DeviceRegistry
from swarmgate.routing.states import ConnectionState

NOW = 1000.0
CATALOG = Pricing(input_per_1m_micros=100, output_per_1m_micros=200)


async def _noop(_text: str) -> None:
    return None


@dataclass
class D:
    """One row of a table: a device as routing sees it."""

    name: str
    account: str = "acct"
    slots: int = 1
    active: int = 0
    ttft: float | None = 100.0
    tps: float | None = 50.0
    success: float = 1.0
    samples: int = MEASURED_AFTER
    state: ConnectionState = ConnectionState.READY
    cooldown_until: float = 0.0
    trust: float = 0.5
    verified: bool = False
    suspended: bool = False
    price: Pricing | None = None
    models: tuple[str, ...] = ("m",)


def build(row: D) -> DeviceConnection:
    profile = DeviceProfile(device_id=row.name, account_id=row.account)
    for model in row.models:
        stats = profile.model_stats(model)
        stats.ttft_ms, stats.tokens_per_s = row.ttft, row.tps
        stats.success, stats.samples = row.success, row.samples
        if row.price is not None:
            profile.prices[model] = row.price
    profile.cooldown_until = row.cooldown_until
    profile.trust = row.trust
    profile.verified = row.verified
    profile.suspended_reason = "suspected" if row.suspended else None
    conn = DeviceConnection(
        device_id=row.name,
        account_id=row.account,
        region="r",
        slots=row.slots,
        models=frozenset(row.models),
        send_text=_noop,
        profile=profile,
    )
    conn.state = row.state
    for i in range(row.active):
        conn.active[f"{row.name}.{i}"] = asyncio.Queue()
    return conn


def index(rows: list[D]) -> dict[str, ModelPool]:
    registry = DeviceRegistry(pricing_of=lambda _m: CATALOG)
    for row in rows:
        registry.add(build(row))
    return {model: pool for model in ("m", "n") if (pool := registry._pools.get(model))}


class NoExplore(random.Random):
    """A generator whose first draw is never below the exploration share."""

    def __init__(self) -> None:
        super().__init__(7)
        self._first = True

    def random(self) -> float:
        if self._first:
            self._first = False
            return 0.99
        return super().random()


def decide(rows: list[D], route: Route, exclude: frozenset[str] = frozenset()) -> object:
    pools = index(rows)
    chosen = [pools[m] for m in route.models if m in pools]
    decision = choose(chosen, route, exclude, NOW, NoExplore())
    if isinstance(decision, Picked):
        return (
            decision.device.device_id
            if decision.model == "m"
            else (
                decision.device.device_id,
                decision.model,
            )
        )
    if isinstance(decision, Busy):
        return "busy"
    assert isinstance(decision, Rejected)
    return decision.code


M = Route(models=("m",), max_tokens=100)


def r(**changes: object) -> Route:
    values: dict[str, object] = {"models": ("m",), "max_tokens": 100, **changes}
    return Route(**values)  # type: ignore[arg-type]


CHEAP = Pricing(input_per_1m_micros=60, output_per_1m_micros=120)
DEAR = Pricing(input_per_1m_micros=150, output_per_1m_micros=300)

CASES: list[tuple[str, list[D], Route, object]] = [
    ("only one", [D("a")], M, "a"),
    ("least loaded", [D("a", slots=4, active=3), D("b", slots=4, active=1)], M, "b"),
    ("full devices skipped", [D("a", active=1), D("b", slots=2, active=1)], M, "b"),
    ("faster wins (balanced)", [D("a", ttft=300), D("b", ttft=120)], M, "b"),
    ("paused skipped", [D("a", state=ConnectionState.PAUSED), D("b", ttft=900)], M, "b"),
    ("suspended skipped", [D("a", suspended=True), D("b", ttft=900)], M, "b"),
    ("all busy: wait", [D("a", active=1), D("b", active=1)], M, "busy"),
    ("paused only: wait", [D("a", state=ConnectionState.PAUSED)], M, "busy"),
    ("cooling comes last", [D("a", cooldown_until=NOW + 5, ttft=1), D("b", ttft=900)], M, "b"),
    ("a cooling device beats none", [D("a", cooldown_until=NOW + 5)], M, "a"),
    ("cooldown over", [D("a", cooldown_until=NOW - 1, ttft=1), D("b", ttft=2)], M, "a"),
    # tiers
    (
        "fastest: generation speed counts, not only first token",
        [D("a", ttft=50, tps=5), D("b", ttft=400, tps=100)],
        r(tier="fastest"),
        "b",
    ),
    (
        "fastest: a short answer favours the quick first token",
        [D("a", ttft=50, tps=5), D("b", ttft=400, tps=100)],
        r(tier="fastest", max_tokens=1),
        "a",
    ),
    (
        "cheapest: lowest price, though slower",
        [D("a", ttft=50, price=DEAR), D("b", ttft=900, price=CHEAP)],
        r(tier="cheapest"),
        "b",
    ),
    (
        "cheapest: equal prices, then speed",
        [D("a", ttft=500, price=CHEAP), D("b", ttft=90, price=CHEAP)],
        r(tier="cheapest"),
        "b",
    ),
    (
        "balanced: a much cheaper device that is a bit slower",
        [D("a", ttft=100, tps=50, price=DEAR), D("b", ttft=150, tps=45, price=CHEAP)],
        r(tier="balanced"),
        "b",
    ),
    (
        "balanced: an unreliable device loses",
        [D("a", ttft=100, success=0.2), D("b", ttft=150)],
        r(tier="balanced"),
        "b",
    ),
    # constraints
    ("trusted_only", [D("a", trust=0.5, ttft=1), D("b", trust=0.9)], r(trusted_only=True), "b"),
    ("trusted_only: none", [D("a", trust=0.8)], r(trusted_only=True), "NO_TRUSTED_DEVICE"),
    ("verified", [D("a", ttft=1), D("b", verified=True)], r(verified_only=True), "b"),
    ("verified: none", [D("a")], r(verified_only=True), "NO_VERIFIED_DEVICE"),
    ("allow by device", [D("a", ttft=1), D("b")], r(allow=frozenset({"b"})), "b"),
    (
        "allow by provider",
        [D("a", ttft=1), D("b", account="p2")],
        r(allow=frozenset({"p2"})),
        "b",
    ),
    ("allow: nobody", [D("a")], r(allow=frozenset({"zz"})), "NO_ALLOWED_HOSTER"),
    ("deny by device", [D("a", ttft=1), D("b")], r(deny=frozenset({"a"})), "b"),
    (
        "deny by provider",
        [D("a", ttft=1, account="p1"), D("b")],
        r(deny=frozenset({"p1"})),
        "b",
    ),
    ("deny everyone", [D("a")], r(deny=frozenset({"a"})), "NO_ALLOWED_HOSTER"),
    (
        "max_price",
        [D("a", ttft=1, price=DEAR), D("b", price=CHEAP)],
        r(max_price=CATALOG),
        "b",
    ),
    ("max_price: none", [D("a", price=DEAR)], r(max_price=CATALOG), "PRICE_ABOVE_MAX"),
    (
        "max_latency_ms",
        [D("a", ttft=800, tps=500), D("b", ttft=100, tps=20)],
        r(max_latency_ms=300, tier="fastest"),
        "b",
    ),
    (
        "max_latency_ms counts load",
        [D("a", ttft=200, slots=2, active=1), D("b", ttft=250)],
        r(max_latency_ms=300),
        "b",
    ),
    (
        "max_latency_ms: unmeasured devices are assumed slow",
        [D("a", ttft=None, samples=0)],
        r(max_latency_ms=300),
        "LATENCY_ABOVE_MAX",
    ),
    (
        "the constraint that emptied the field is named",
        [D("a", trust=0.9, price=DEAR), D("b", trust=0.2)],
        r(trusted_only=True, max_price=CATALOG),
        "PRICE_ABOVE_MAX",
    ),
    (
        "the earliest failing constraint of the longest survivor",
        [D("a", trust=0.2, price=DEAR), D("b", trust=0.2)],
        r(trusted_only=True, max_price=CATALOG),
        "NO_TRUSTED_DEVICE",
    ),
    (
        "constraint met but busy: wait, not reject",
        [D("a", trust=0.9, active=1), D("b", trust=0.1)],
        r(trusted_only=True),
        "busy",
    ),
    # models
    (
        "fallback: the first model with a device",
        [D("a", models=("n",))],
        r(models=("m", "n")),
        ("a", "n"),
    ),
    (
        "fallback: the first model wins when it has a free device",
        [D("a", models=("n",), ttft=1), D("b", ttft=900)],
        r(models=("m", "n")),
        "b",
    ),
    (
        "fallback: a busy first model falls back",
        [D("a", models=("n",)), D("b", active=1)],
        r(models=("m", "n")),
        ("a", "n"),
    ),
    (
        "auto: the best device over every model",
        [D("a", models=("n",), ttft=10), D("b", ttft=900)],
        r(models=("m", "n"), any_model=True, tier="fastest"),
        ("a", "n"),
    ),
]


@pytest.mark.parametrize(
    ("rows", "route", "expected"),
    [pytest.param(rows, route, expected, id=name) for name, rows, route, expected in CASES],
)
def test_choose(rows: list[D], route: Route, expected: object) -> None:
    assert decide(rows, route) == expected


def test_excluded_devices_are_skipped() -> None:
    assert decide([D("a", ttft=1), D("b", ttft=900)], M, frozenset({"a"})) == "b"
    assert decide([D("a")], M, frozenset({"a"})) == "NO_DEVICE_AVAILABLE"


def test_unmeasured_devices_get_an_exploration_share() -> None:
    rows = [D("fast", ttft=10), D("new", ttft=None, tps=None, samples=0)]
    pools = index(rows)
    rng = random.Random(1)
    picks = [choose([pools["m"]], M, frozenset(), NOW, rng) for _ in range(2000)]
    new = sum(1 for p in picks if isinstance(p, Picked) and p.device.device_id == "new")
    assert 100 < new < 320, new  # about EXPLORE_SHARE of 2000, plus nothing else
    assert all(isinstance(p, Picked) for p in picks)


def test_an_unmeasured_device_cooling_down_after_a_failure_is_not_explored() -> None:
    rows = [D("fast", ttft=10), D("hangs", ttft=None, tps=None, samples=0)]
    pools = index(rows)
    hangs = next(d for d in pools["m"].unmeasured if d.device_id == "hangs")
    hangs.profile.observe_failure("m", NOW)  # it timed out: cooling until NOW + backoff
    rng = random.Random(1)
    picks = [choose([pools["m"]], M, frozenset(), NOW + 0.5, rng) for _ in range(500)]
    assert all(isinstance(p, Picked) and p.device.device_id == "fast" for p in picks)
    # Once its cooldown is over it is explored again.
    later = hangs.profile.cooldown_until + 1
    picks = [choose([pools["m"]], M, frozenset(), later, rng) for _ in range(2000)]
    assert any(isinstance(p, Picked) and p.device.device_id == "hangs" for p in picks)


def test_a_large_pool_is_sampled_and_still_finds_a_good_device() -> None:
    rows = [D(f"d{i}", ttft=100 + i) for i in range(SCAN_LIMIT * 20)]
    pools = index(rows)
    rng = random.Random(3)
    ttfts = []
    for _ in range(200):
        decision = choose([pools["m"]], M, frozenset(), NOW, rng)
        assert isinstance(decision, Picked)
        stats = decision.device.profile.stats["m"]
        assert stats.ttft_ms is not None
        ttfts.append(stats.ttft_ms)
    ttfts.sort()
    # Best of a random sample: well inside the fastest quarter, and not always one device.
    assert ttfts[len(ttfts) // 2] < 100 + SCAN_LIMIT * 20 / 4
    assert len(set(ttfts)) > 20


def test_a_rare_match_in_a_large_pool_is_found_by_the_scan() -> None:
    rows = [D(f"d{i}") for i in range(SCAN_LIMIT * 10)] + [D("v", verified=True)]
    assert decide(rows, r(verified_only=True)) == "v"


@pytest.mark.parametrize(
    ("failures", "cooldown"),
    [(1, 2.0), (2, 4.0), (3, 8.0), (5, 32.0), (6, 60.0), (20, 60.0)],
)
def test_cooldown_grows_with_consecutive_failures_and_is_capped(
    failures: int, cooldown: float
) -> None:
    profile = DeviceProfile(device_id="a", account_id="p")
    for _ in range(failures):
        profile.observe_failure("m", NOW)
    assert profile.cooldown_until - NOW == pytest.approx(cooldown)
    profile.observe_success("m", 100.0, 10, 0.5)
    assert profile.cooldown_until == 0 and profile.consecutive_failures == 0
    stats = profile.stats["m"]
    assert stats.ttft_ms == 100.0 and stats.tokens_per_s == pytest.approx(20.0)


def test_occupy_and_vacate_keep_the_free_set_current() -> None:
    registry = DeviceRegistry()
    conn = build(D("a", slots=2))
    registry.add(conn)
    pool = registry._pools["m"]
    conn.occupy("j1", asyncio.Queue())
    assert conn.state is ConnectionState.READY and conn in pool.free
    conn.occupy("j2", asyncio.Queue())
    assert conn.state is ConnectionState.BUSY and not conn.accepting
    assert conn not in pool.free
    assert conn.vacate("j1") is True
    assert conn.state is ConnectionState.READY and conn in pool.free
    assert conn.vacate("j1") is False  # twice is harmless
    assert "j1" in conn.recent
    conn.transition(ConnectionState.PAUSED)
    assert conn not in pool.free
    conn.transition(ConnectionState.READY)
    assert conn in pool.free


async def test_registry_warming_busy_rejected_and_wakeup() -> None:
    registry = DeviceRegistry()
    with pytest.raises(ModelWarming):
        await registry.reserve(M, set(), 0.1)
    conn = build(D("a"))
    registry.add(conn)
    assert await registry.reserve(M, set(), 0.1) == (conn, "m")
    with pytest.raises(NoDeviceMatches) as rejected:
        await registry.reserve(r(trusted_only=True), set(), 0.1)
    assert rejected.value.code == "NO_TRUSTED_DEVICE"
    assert rejected.value.param == "trusted_only"
    conn.occupy("j", asyncio.Queue())
    with pytest.raises(DevicesBusy) as busy:
        await registry.reserve(M, set(), 0.05)
    assert busy.value.retry_after == 1
    waiter = asyncio.create_task(registry.reserve(M, set(), 2.0))
    await asyncio.sleep(0.01)
    conn.vacate("j")
    registry.slot_freed(conn)
    assert await asyncio.wait_for(waiter, 1) == (conn, "m")
    # Every device excluded: no point waiting.
    assert await registry.reserve(M, {"a"}, 1.0) is None


def test_registry_replaces_a_reconnected_device_and_indexes_by_model() -> None:
    registry = DeviceRegistry()
    old = build(D("a", models=("m", "n")))
    registry.add(old)
    new = build(D("a", models=("m",)))
    assert registry.add(new) is old
    assert registry.get("a") is new
    assert registry.model_counts() == {"m": 1}
    registry.remove(new)
    assert registry.devices() == [] and not registry.has_model("m")


def test_the_price_ceiling_covers_every_member() -> None:
    pools = index([D("a", price=CHEAP), D("b", price=DEAR), D("c")])
    assert pools["m"].price_ceiling(None) == DEAR
    assert pools["m"].price_ceiling(CATALOG) == CATALOG
