"""Choosing a device for a request: a pure function over the index by model.

``choose(pools, route, exclude, now, rng)`` looks only at its arguments (the random
generator included), so a table of devices and requests pins its answer down.

**Constraints**, applied in this order; a request that no device can satisfy is
rejected at once with the code of the constraint that emptied the field (the last
one the longest-surviving device failed), never left waiting:

    allow_hosters / deny_hosters   NO_ALLOWED_HOSTER    (provider account or device ids)
    privacyLevel: "verified"       NO_VERIFIED_DEVICE   (a valid integrity attestation)
    trusted_only                   NO_TRUSTED_DEVICE    (trust score above 0.8)
    max_price                      PRICE_ABOVE_MAX      (the device's price for the model)
    max_latency_ms                 LATENCY_ABOVE_MAX    (predicted time to first token)

Devices that pass every constraint but are busy, paused or draining make the request
wait for a slot (bounded by the dispatcher); devices cooling down after failures are
used only when no other passing device has a free slot, so a model's devices are
never all ejected at once.

**Tiers** — each scores a device for this request; lower wins:

    fastest    predicted completion time: (ttft + max_tokens / tokens_per_s) * (1 + load)
    cheapest   the request's cost at the device's price, then predicted time
    balanced   0.5 * time / T + 0.3 * cost / C + 0.2 * (1 - success rate)

where ``load`` is the share of the device's slots in use, T the predicted time of an
unmeasured device (prior: 1 s to first token, 20 tokens/s) and C the request's cost at
the catalog price. A device with fewer than ``MEASURED_AFTER`` finished jobs for the
model is scored with the priors, and ``EXPLORE_SHARE`` of decisions go to the least
loaded unmeasured device, so new devices get measured.

**Scale**: a pool with more than ``SCAN_LIMIT`` free devices is not scanned; ``SAMPLE``
random free devices are scored instead (power-of-k choices: close to the best, and it
spreads load instead of herding onto one device), together with the pool's last ``HOT``
winners, so a good device once found keeps competing while it is free. ``trusted_only`` and ``verified``
requests sample the pool's trusted or verified free devices, kept as sets of their own.
Only when ``RESAMPLES`` samples hold no usable device does the decision scan the pool.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING, Any, Literal

from swarmgate.catalog import Pricing

if TYPE_CHECKING:
    from swarmgate.routing.registry import DeviceConnection

Tier = Literal["cheapest", "balanced", "fastest"]

TRUSTED_ABOVE = 0.8
PRIOR_TTFT_MS = 1000.0
PRIOR_TOKENS_PER_S = 20.0
EXPLORE_SHARE = 0.1
SCAN_LIMIT = 64
SAMPLE = 8
HOT = 8  # recent winners kept per pool and scored with each sample
RESAMPLES = 3  # samples drawn before a decision falls back to a scan

# Constraint index → (error code, request parameter).
PASS = 99
_ALLOW, _VERIFIED, _TRUSTED, _PRICE, _LATENCY = range(5)
CONSTRAINTS: dict[int, tuple[str, str]] = {
    _ALLOW: ("NO_ALLOWED_HOSTER", "allow_hosters"),
    _VERIFIED: ("NO_VERIFIED_DEVICE", "privacyLevel"),
    _TRUSTED: ("NO_TRUSTED_DEVICE", "trusted_only"),
    _PRICE: ("PRICE_ABOVE_MAX", "max_price"),
    _LATENCY: ("LATENCY_ABOVE_MAX", "max_latency_ms"),
}
_WHY = {
    _ALLOW: "none is allowed by allow_hosters/deny_hosters",
    _VERIFIED: "none of the allowed ones has a valid integrity attestation",
    _TRUSTED: "none of the eligible ones has a trust score above 0.8",
    _PRICE: "every eligible one charges more than max_price",
    _LATENCY: "every eligible one is predicted to answer slower than max_latency_ms",
}


# Not frozen, like JobSpec: built per request on the hot path. Admission sets the
# request's own route's ``price_caps`` once, before the job is dispatched (``admit``);
# nothing else changes one.
@dataclass(slots=True)
class Route:
    """A request's routing controls."""

    models: tuple[str, ...]  # the model, then fallback_models, in order
    tier: Tier = "balanced"
    any_model: bool = False  # model "auto": every model in ``models`` competes at once
    trusted_only: bool = False
    verified_only: bool = False
    max_latency_ms: int | None = None
    allow: frozenset[str] = frozenset()  # provider account or device ids; empty: anyone
    deny: frozenset[str] = frozenset()
    max_price: Pricing | None = None  # per 1M tokens, each part an upper bound
    prompt_tokens: int = 0  # a bound, to compare costs
    max_tokens: int = 256

    # Per model, the dearest price the request's hold covers (set at admission).
    price_caps: Mapping[str, Pricing] | None = None

    def capped_each(self, caps: Mapping[str, Pricing]) -> Route:
        """This route, refusing devices dearer than what the hold covers, per model.

        Built field by field: ``dataclasses.replace`` introspects the class on every call,
        and this runs once per request."""
        return Route(
            self.models,
            self.tier,
            self.any_model,
            self.trusted_only,
            self.verified_only,
            self.max_latency_ms,
            self.allow,
            self.deny,
            self.max_price,
            self.prompt_tokens,
            self.max_tokens,
            caps,
        )

    def price_cap(self, model: str) -> Pricing | None:
        if self.price_caps is not None:
            cap = self.price_caps.get(model)
            if cap is not None:
                return cap
        return self.max_price


def route_to_json(route: Route) -> dict[str, object]:
    """A route as JSON, for a queued job that runs later (caps are set when it runs)."""
    return {
        "models": list(route.models),
        "tier": route.tier,
        "trusted_only": route.trusted_only,
        "verified_only": route.verified_only,
        "max_latency_ms": route.max_latency_ms,
        "allow": sorted(route.allow),
        "deny": sorted(route.deny),
        "max_price": None if route.max_price is None else route.max_price.model_dump(),
        "prompt_tokens": route.prompt_tokens,
        "max_tokens": route.max_tokens,
    }


def route_from_json(data: Mapping[str, Any]) -> Route:
    price = data.get("max_price")
    return Route(
        models=tuple(data["models"]),
        tier=data.get("tier", "balanced"),
        trusted_only=bool(data.get("trusted_only")),
        verified_only=bool(data.get("verified_only")),
        max_latency_ms=data.get("max_latency_ms"),
        allow=frozenset(data.get("allow", ())),
        deny=frozenset(data.get("deny", ())),
        max_price=None if price is None else Pricing.model_validate(price),
        prompt_tokens=int(data.get("prompt_tokens", 0)),
        max_tokens=int(data.get("max_tokens", 256)),
    )


def cheaper(a: Pricing, b: Pricing | None) -> Pricing:
    """Each part the lower of the two."""
    if b is None:
        return a
    return Pricing(
        input_per_1m_micros=min(a.input_per_1m_micros, b.input_per_1m_micros),
        output_per_1m_micros=min(a.output_per_1m_micros, b.output_per_1m_micros),
    )


def dearer(a: Pricing, b: Pricing) -> Pricing:
    """Each part the higher of the two."""
    return Pricing(
        input_per_1m_micros=max(a.input_per_1m_micros, b.input_per_1m_micros),
        output_per_1m_micros=max(a.output_per_1m_micros, b.output_per_1m_micros),
    )


class DeviceSet:
    """Devices with O(1) add, discard and random pick (a list plus positions)."""

    __slots__ = ("_items", "_pos")

    def __init__(self) -> None:
        self._items: list[DeviceConnection] = []
        self._pos: dict[str, int] = {}

    def add(self, device: DeviceConnection) -> None:
        if device.device_id not in self._pos:
            self._pos[device.device_id] = len(self._items)
            self._items.append(device)

    def discard(self, device: DeviceConnection) -> None:
        index = self._pos.get(device.device_id)
        if index is None or self._items[index] is not device:
            return
        del self._pos[device.device_id]
        last = self._items.pop()
        if index < len(self._items):
            self._items[index] = last
            self._pos[last.device_id] = index

    def __contains__(self, device: DeviceConnection) -> bool:
        index = self._pos.get(device.device_id)
        return index is not None and self._items[index] is device

    def __len__(self) -> int:
        return len(self._items)

    def get(self, device_id: str) -> DeviceConnection | None:
        index = self._pos.get(device_id)
        return None if index is None else self._items[index]

    def __iter__(self) -> Iterator[DeviceConnection]:
        return iter(self._items)

    def sample(self, rng: random.Random, k: int) -> list[DeviceConnection]:
        items = self._items
        n = len(items)
        return [items[int(rng.random() * n)] for _ in range(k)]


class ModelPool:
    """The index entry of one model: its devices, those with a free slot, and the
    unmeasured ones. The registry keeps the sets current; ``choose`` only reads them."""

    __slots__ = (
        "by_account",
        "ceiling",
        "free",
        "hot",
        "members",
        "model",
        "pricing",
        "trusted_free",
        "unmeasured",
        "verified_free",
    )

    def __init__(self, model: str, pricing: Pricing) -> None:
        self.model = model
        self.pricing = pricing
        self.members = DeviceSet()
        self.free = DeviceSet()
        # The free devices that pass trusted_only / privacyLevel "verified": a request
        # with either samples these, so a rare match is found without a scan.
        self.trusted_free = DeviceSet()
        self.verified_free = DeviceSet()
        self.unmeasured = DeviceSet()
        self.by_account: dict[str, DeviceSet] = {}
        # The last few devices chosen from a sample: scored again with the next sample,
        # so good devices found by chance are not lost to the next draw.
        self.hot: deque[DeviceConnection] = deque(maxlen=HOT)
        # The dearest price of any device that joined (it never drops while the pool
        # lives: a hold sized by it covers every member).
        self.ceiling = Pricing(input_per_1m_micros=0, output_per_1m_micros=0)

    def price_of(self, device: DeviceConnection) -> Pricing:
        return device.profile.prices.get(self.model, self.pricing)

    def price_ceiling(self, cap: Pricing | None) -> Pricing:
        return cheaper(self.ceiling, cap)

    def add(self, device: DeviceConnection) -> None:
        self.members.add(device)
        self.ceiling = dearer(self.ceiling, self.price_of(device))
        self.by_account.setdefault(device.account_id, DeviceSet()).add(device)

    def place(self, device: DeviceConnection) -> None:
        """Puts ``device`` in exactly the free sets it belongs to now."""
        if device.accepting:
            self.free.add(device)
            profile = device.profile
            if profile.trust > TRUSTED_ABOVE:
                self.trusted_free.add(device)
            else:
                self.trusted_free.discard(device)
            if profile.verified:
                self.verified_free.add(device)
            else:
                self.verified_free.discard(device)
        else:
            self.free.discard(device)
            self.trusted_free.discard(device)
            self.verified_free.discard(device)

    def discard(self, device: DeviceConnection) -> None:
        self.members.discard(device)
        self.free.discard(device)
        self.trusted_free.discard(device)
        self.verified_free.discard(device)
        self.unmeasured.discard(device)
        if device in self.hot:
            self.hot.remove(device)
        mine = self.by_account.get(device.account_id)
        if mine is not None:
            mine.discard(device)
            if not mine:
                del self.by_account[device.account_id]

    def listed(self, hosters: Iterable[str]) -> list[DeviceConnection]:
        """Members named by device id or provider account id."""
        found: dict[str, DeviceConnection] = {}
        for hoster in hosters:
            device = self.members.get(hoster)
            if device is not None:
                found[device.device_id] = device
            for device in self.by_account.get(hoster, ()):
                found[device.device_id] = device
        return list(found.values())


@dataclass(frozen=True, slots=True)
class Picked:
    device: DeviceConnection
    model: str
    explored: bool = False


@dataclass(frozen=True, slots=True)
class Busy:
    """Some device passes every constraint but none can start now: wait for a slot."""

    models: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Rejected:
    code: str
    param: str | None
    message: str


Decision = Picked | Busy | Rejected


def failed_constraint(device: DeviceConnection, pool: ModelPool, route: Route) -> int:
    """The first constraint ``device`` fails for this request, or PASS."""
    profile = device.profile
    if route.deny and (device.device_id in route.deny or device.account_id in route.deny):
        return _ALLOW
    if route.allow and device.device_id not in route.allow and device.account_id not in route.allow:
        return _ALLOW
    if route.verified_only and not profile.verified:
        return _VERIFIED
    if route.trusted_only and profile.trust <= TRUSTED_ABOVE:
        return _TRUSTED
    cap = route.price_cap(pool.model)
    if cap is not None:
        price = profile.prices.get(pool.model, pool.pricing)
        if (
            price.input_per_1m_micros > cap.input_per_1m_micros
            or price.output_per_1m_micros > cap.output_per_1m_micros
        ):
            return _PRICE
    if route.max_latency_ms is not None and predicted_ttft_ms(device, pool.model) > (
        route.max_latency_ms
    ):
        return _LATENCY
    return PASS


def predicted_ttft_ms(device: DeviceConnection, model: str) -> float:
    stats = device.profile.stats.get(model)
    ttft = stats.ttft_ms if stats is not None and stats.ttft_ms is not None else PRIOR_TTFT_MS
    return ttft * (1.0 + len(device.active) / device.slots)


def predicted_ms(device: DeviceConnection, model: str, max_tokens: int) -> float:
    """Queue-aware completion time: first token plus generation, stretched by load."""
    stats = device.profile.stats.get(model)
    ttft = PRIOR_TTFT_MS
    speed = PRIOR_TOKENS_PER_S
    if stats is not None:
        if stats.ttft_ms is not None:
            ttft = stats.ttft_ms
        if stats.tokens_per_s:
            speed = stats.tokens_per_s
    return (ttft + max_tokens * 1000.0 / speed) * (1.0 + len(device.active) / device.slots)


def _scaled_cost(price: Pricing, route: Route) -> int:
    """The request's cost in micro-dollars times one million: exact, so that prices too
    close to tell apart in whole micro-dollars still order correctly."""
    return route.prompt_tokens * price.input_per_1m_micros + route.max_tokens * (
        price.output_per_1m_micros
    )


COOLING = 1e30  # added to a cooling device's rank: it comes after every other device

Ranked = tuple[float, float, "DeviceConnection"]  # (rank, predicted ms, device)


def _best(
    candidates: Iterable[DeviceConnection],
    pool: ModelPool,
    route: Route,
    exclude: frozenset[str] | set[str],
    now: float,
    *,
    known_free: bool = False,
) -> Ranked | None:
    """The best usable candidate by the route's tier: lowest rank, then predicted time.

    The hot loop of a decision, so the tier's formula is inlined and the request's
    constants are computed once; ``known_free`` skips the slot check for devices taken
    from a pool's free set (the registry keeps it exact).
    """
    model = pool.model
    tier = route.tier
    max_tokens = route.max_tokens
    prompt = route.prompt_tokens
    catalog = pool.pricing
    reference_ms = PRIOR_TTFT_MS + max_tokens * 1000.0 / PRIOR_TOKENS_PER_S
    reference_cost = max(1, _scaled_cost(catalog, route))
    # A price cap at or above the pool's ceiling (the dearest price of any member, ever)
    # refuses no member: the usual case, a billed request capped at what its hold covers.
    cap = route.price_cap(model)
    ceiling = pool.ceiling
    constrained = bool(
        route.allow
        or route.deny
        or route.verified_only
        or route.trusted_only
        or route.max_latency_ms is not None
        or (
            cap is not None
            and (
                ceiling.input_per_1m_micros > cap.input_per_1m_micros
                or ceiling.output_per_1m_micros > cap.output_per_1m_micros
            )
        )
    )
    best: Ranked | None = None
    for device in candidates:
        if exclude and device.device_id in exclude:
            continue
        if not known_free and not device.accepting:
            continue
        if constrained and failed_constraint(device, pool, route) != PASS:
            continue
        profile = device.profile
        stats = profile.stats.get(model)
        ttft, speed, success = PRIOR_TTFT_MS, PRIOR_TOKENS_PER_S, 1.0
        if stats is not None:
            if stats.ttft_ms is not None:
                ttft = stats.ttft_ms
            if stats.tokens_per_s:
                speed = stats.tokens_per_s
            success = stats.success
        time_ms = (ttft + max_tokens * 1000.0 / speed) * (1.0 + len(device.active) / device.slots)
        if tier == "fastest":
            rank = time_ms
        else:
            price = profile.prices.get(model, catalog) if profile.prices else catalog
            cost = prompt * price.input_per_1m_micros + max_tokens * price.output_per_1m_micros
            if tier == "cheapest":
                rank = float(cost)
            else:
                rank = (
                    0.5 * time_ms / reference_ms
                    + 0.3 * cost / reference_cost
                    + 0.2 * (1.0 - success)
                )
        if profile.cooldown_until > now:
            rank += COOLING
        if best is None or rank < best[0] or (rank == best[0] and time_ms < best[1]):
            best = (rank, time_ms, device)
    return best


def _usable(device: DeviceConnection, exclude: frozenset[str] | set[str]) -> bool:
    return device.accepting and device.device_id not in exclude


def _explore(
    pool: ModelPool,
    route: Route,
    exclude: frozenset[str] | set[str],
    now: float,
    rng: random.Random,
) -> DeviceConnection | None:
    """The least loaded unmeasured device that may take this request, if any. A device
    cooling down after a failure is not explored: one that never finishes a job stays
    unmeasured, and would otherwise keep getting a share of the traffic."""
    unmeasured = pool.unmeasured
    candidates: Iterable[DeviceConnection] = (
        unmeasured if len(unmeasured) <= SCAN_LIMIT else unmeasured.sample(rng, SAMPLE)
    )
    best: DeviceConnection | None = None
    best_load = 2.0
    for device in candidates:
        if not _usable(device, exclude) or failed_constraint(device, pool, route) != PASS:
            continue
        if device.profile.cooldown_until > now:
            continue
        load = len(device.active) / device.slots
        if load < best_load:
            best, best_load = device, load
    return best


def _pick_in_pool(
    pool: ModelPool,
    route: Route,
    exclude: frozenset[str] | set[str],
    now: float,
    rng: random.Random,
    sample: int = SAMPLE,
) -> Ranked | None:
    if route.allow:
        # An allow-list names few hosters: look them up instead of searching the pool.
        return _best(pool.listed(route.allow), pool, route, exclude, now)
    free = (
        pool.verified_free
        if route.verified_only
        else pool.trusted_free
        if route.trusted_only
        else pool.free
    )
    if len(free) <= SCAN_LIMIT:
        return _best(free, pool, route, exclude, now, known_free=True)
    for attempt in range(RESAMPLES):
        candidates = free.sample(rng, sample)
        if attempt == 0 and pool.hot:
            # The most recent winners join the first draw (as many as it has; they may
            # have filled up since, so they are checked like any listed device).
            candidates.extend(d for d in islice(reversed(pool.hot), sample) if d.accepting)
        found = _best(candidates, pool, route, exclude, now, known_free=True)
        if found is not None and found[0] < COOLING:
            return found
    # Rare: samples with no usable device. The scan finds one if there is any.
    return _best(free, pool, route, exclude, now, known_free=True)


def choose(
    pools: Sequence[ModelPool],
    route: Route,
    exclude: frozenset[str] | set[str],
    now: float,
    rng: random.Random,
) -> Decision:
    """The device (and model) for this request, or why there is none; see the module doc.

    ``pools`` are the route's models in order, those with no device left out. Without
    ``any_model`` the first model with a usable device wins (fallback order); with it,
    the best device over all of them does.
    """
    explore = rng.random() < EXPLORE_SHARE
    # "auto" samples every model's pool, so each contributes a share of the sample.
    per_pool = max(2, SAMPLE // len(pools)) if route.any_model and pools else SAMPLE
    best: Ranked | None = None
    best_pool: ModelPool | None = None
    for pool in pools:
        if explore and pool.unmeasured:
            device = _explore(pool, route, exclude, now, rng)
            if device is not None:
                return Picked(device, pool.model, explored=True)
        found = _pick_in_pool(pool, route, exclude, now, rng, per_pool)
        if found is None:
            continue
        if best is None or found[:2] < best[:2]:
            best, best_pool = found, pool
        if not route.any_model and found[0] < COOLING:
            break  # fallback order: a model with a healthy device wins
    if best is not None and best_pool is not None:
        return Picked(best[2], best_pool.model)
    return _no_pick(pools, route, exclude)


def _no_pick(
    pools: Sequence[ModelPool], route: Route, exclude: frozenset[str] | set[str]
) -> Decision:
    """Busy if some untried device passes every constraint; else the emptying constraint."""
    waiting: list[str] = []
    furthest = -1
    for pool in pools:
        for device in pool.members:
            if device.device_id in exclude or device.profile.suspended_reason is not None:
                continue
            failed = failed_constraint(device, pool, route)
            if failed == PASS:
                waiting.append(pool.model)
                break
            furthest = max(furthest, failed)
    if waiting:
        return Busy(tuple(waiting))
    if furthest < 0:
        return Rejected("NO_DEVICE_AVAILABLE", None, "No untried device serves this model.")
    code, param = CONSTRAINTS[furthest]
    names = ", ".join(pool.model for pool in pools)
    return Rejected(
        code,
        param,
        f"No device can serve this request: devices serve {names}, but {_WHY[furthest]}.",
    )
