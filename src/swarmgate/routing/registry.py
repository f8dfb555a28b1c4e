"""Connected devices, indexed by model, with slot accounting and a bounded wait queue.

The registry is in-process here; the scale-out mode puts presence in Redis behind
the same calls. Choosing among candidates is the pure ``routing.choice.choose``; the
registry keeps its index (a ``ModelPool`` per model) current as devices come, go,
fill and free their slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter, defaultdict, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import ClassVar

from swarmgate.catalog import Pricing
from swarmgate.errors import DeviceGone, DevicesBusy, ModelWarming, NoDeviceMatches
from swarmgate.protocol import Delta, Done, JobError
from swarmgate.routing.choice import (
    PASS,
    SCAN_LIMIT,
    Decision,
    ModelPool,
    Picked,
    Rejected,
    Route,
    choose,
    dearer,
    failed_constraint,
)
from swarmgate.routing.profile import DeviceProfile
from swarmgate.routing.states import ConnectionState, check_connection_transition


@dataclass(frozen=True, slots=True)
class DeviceLost:
    """Put on an attempt's channel when its device's connection ends."""

    reason: str


# What an attempt's channel can receive: frames from the device, or word that it is gone.
AttemptEvent = Delta | Done | JobError | DeviceLost


@dataclass(eq=False)
class DeviceConnection:
    # False for a device connected to another gateway of the network (cluster/mesh.py).
    local: ClassVar[bool] = True

    device_id: str
    account_id: str
    region: str
    slots: int
    models: frozenset[str]
    send_text: Callable[[str], Awaitable[None]]
    node_version: str = ""
    state: ConnectionState = ConnectionState.CONNECTING
    pause_reason: str | None = None
    # What the gateway knows of this device; outlives the connection.
    profile: DeviceProfile = field(default=None)  # type: ignore[assignment]
    # Attempt id → the channel its frames go to.
    active: dict[str, asyncio.Queue[AttemptEvent]] = field(default_factory=dict)
    # Frames for the device leave through one writer task, so sends never interleave.
    outbox: asyncio.Queue[str | None] = field(default_factory=asyncio.Queue)
    # Attempt ids this device was given that have since ended; late frames for them are dropped.
    recent: deque[str] = field(default_factory=lambda: deque(maxlen=256))
    last_seen: float = field(default_factory=time.monotonic)
    connected_at: float = field(default_factory=time.monotonic)
    jobs_served: int = 0  # this connection
    close_code: int = 1000
    close_reason: str = ""
    # Models the device is downloading or loading; they make a request "warming", not lost.
    warming: frozenset[str] = frozenset()
    # The index entries this device is in; kept current as its slots and state change.
    pools: list[ModelPool] = field(default_factory=list)
    # Model → the context length the device reported for it (absent: the catalog's).
    contexts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.profile is None:
            self.profile = DeviceProfile(device_id=self.device_id, account_id=self.account_id)

    def transition(self, target: ConnectionState) -> None:
        check_connection_transition(self.state, target)
        self.state = target
        self.reindex()

    def reindex(self) -> None:
        """Keeps this device in its pools' free sets exactly while it can take a job
        (and in the trusted and verified ones while it also is that)."""
        for pool in self.pools:
            pool.place(self)

    def send(self, text: str) -> None:
        """Queues a frame for the device; raises DeviceGone once the connection is closed."""
        if self.state is ConnectionState.CLOSED:
            raise DeviceGone(f"device {self.device_id} is disconnected")
        self.outbox.put_nowait(text)

    def occupy(self, attempt_id: str, channel: asyncio.Queue[AttemptEvent]) -> None:
        self.active[attempt_id] = channel
        if self.state is ConnectionState.READY and self.free_slots <= 0:
            self.transition(ConnectionState.BUSY)
        elif self.free_slots <= 0:
            self.reindex()

    def vacate(self, attempt_id: str) -> bool:
        if self.active.pop(attempt_id, None) is None:
            return False
        self.recent.append(attempt_id)
        if self.state is ConnectionState.BUSY and self.free_slots > 0:
            self.transition(ConnectionState.READY)
        elif self.free_slots == 1:
            self.reindex()
        return True

    def close(self, reason: str) -> None:
        """Marks the connection closed and tells every running attempt its device is gone."""
        if self.state is ConnectionState.CLOSED:
            return
        self.transition(ConnectionState.CLOSED)
        self.close_reason = reason
        lost = DeviceLost(reason)
        for channel in self.active.values():
            channel.put_nowait(lost)
        self.outbox.put_nowait(None)

    @property
    def free_slots(self) -> int:
        return self.slots - len(self.active)

    @property
    def accepting(self) -> bool:
        return (
            self.state in (ConnectionState.READY, ConnectionState.BUSY)
            and self.free_slots > 0
            and self.profile.suspended_reason is None
        )


class DeviceRegistry:
    def __init__(
        self,
        pricing_of: Callable[[str], Pricing | None] = lambda _model: None,
        max_waiters_per_model: int = 1024,
        warming_retry_after_s: int = 300,
        downloading_retry_after_s: int = 30,
        rng: random.Random | None = None,
    ) -> None:
        self._by_id: dict[str, DeviceConnection] = {}
        self._pools: dict[str, ModelPool] = {}
        # Model → context length → how many connected devices reported it.
        self._contexts: defaultdict[str, Counter[int]] = defaultdict(Counter)
        self._pricing_of = pricing_of
        self._warming: dict[str, set[str]] = {}
        self._waiters: dict[str, deque[asyncio.Future[None]]] = {}
        self._max_waiters = max_waiters_per_model
        self._warming_retry_after_s = warming_retry_after_s
        self._downloading_retry_after_s = downloading_retry_after_s
        self._rng = rng or random.Random()

    # -- membership -------------------------------------------------------------------
    def _pool(self, model: str) -> ModelPool:
        pool = self._pools.get(model)
        if pool is None:
            pricing = self._pricing_of(model) or _FREE
            pool = self._pools[model] = ModelPool(model, pricing)
        return pool

    def _join(self, device: DeviceConnection, model: str) -> None:
        context = device.contexts.get(model)
        if context is not None:
            self._contexts[model][context] += 1
        pool = self._pool(model)
        pool.add(device)
        device.pools.append(pool)
        stats = device.profile.stats.get(model)
        if stats is None or not stats.measured:
            pool.unmeasured.add(device)
        pool.place(device)

    def _leave(self, device: DeviceConnection, model: str) -> None:
        context = device.contexts.get(model)
        if context is not None:
            counts = self._contexts[model]
            counts[context] -= 1
            if counts[context] <= 0:
                del counts[context]
            if not counts:
                del self._contexts[model]
        pool = self._pools.get(model)
        if pool is None:
            return
        pool.discard(device)
        with contextlib.suppress(ValueError):
            device.pools.remove(pool)
        if not pool.members:
            del self._pools[model]

    def add(self, device: DeviceConnection) -> DeviceConnection | None:
        """Registers a ready device; returns the connection it replaces, if any."""
        previous = self._by_id.get(device.device_id)
        if previous is not None:
            self.remove(previous)
        self._by_id[device.device_id] = device
        for model in device.models:
            self._join(device, model)
        self._wake(device.models)
        return previous

    def remove(self, device: DeviceConnection) -> None:
        if self._by_id.get(device.device_id) is device:
            del self._by_id[device.device_id]
            self.set_warming(device, frozenset())
        for model in device.models:
            self._leave(device, model)

    def update_models(
        self,
        device: DeviceConnection,
        models: frozenset[str],
        contexts: dict[str, int] | None = None,
    ) -> None:
        """Re-indexes a connected device whose set of served models changed."""
        if self._by_id.get(device.device_id) is not device:
            return
        if contexts is not None and contexts != device.contexts:
            for model in device.models:  # leave and rejoin with the new context lengths
                self._leave(device, model)
            device.contexts = contexts
            for model in device.models:
                self._join(device, model)
        for model in device.models - models:
            self._leave(device, model)
        added = models - device.models
        device.models = models
        for model in added:
            self._join(device, model)
        self._wake(added)

    def repriced(self, device: DeviceConnection) -> None:
        """Called after a connected device's prices changed."""
        for pool in device.pools:
            pool.ceiling = dearer(pool.ceiling, pool.price_of(device))

    def measured(self, device: DeviceConnection, model: str) -> None:
        """Called after a device's stats for ``model`` changed: it may leave the unmeasured."""
        stats = device.profile.stats.get(model)
        pool = self._pools.get(model)
        if pool is not None and stats is not None and stats.measured:
            pool.unmeasured.discard(device)

    def set_warming(self, device: DeviceConnection, models: frozenset[str]) -> None:
        for model in device.warming - models:
            holders = self._warming.get(model)
            if holders is not None:
                holders.discard(device.device_id)
                if not holders:
                    del self._warming[model]
        for model in models - device.warming:
            self._warming.setdefault(model, set()).add(device.device_id)
        device.warming = models

    def warming_count(self, model: str) -> int:
        return len(self._warming.get(model, ()))

    def get(self, device_id: str) -> DeviceConnection | None:
        return self._by_id.get(device_id)

    def devices(self) -> list[DeviceConnection]:
        return list(self._by_id.values())

    def has_model(self, model: str) -> bool:
        return model in self._pools

    def context_length(self, model: str) -> int | None:
        """The smallest context any connected device reported for ``model`` (None: no
        device reported one)."""
        counts = self._contexts.get(model)
        return min(counts) if counts else None

    def device_count(self, model: str) -> int:
        pool = self._pools.get(model)
        return len(pool.members) if pool is not None else 0

    def model_counts(self) -> dict[str, int]:
        return {model: len(pool.members) for model, pool in self._pools.items()}

    def served_models(self) -> list[str]:
        return sorted(self._pools)

    # -- choosing -----------------------------------------------------------------------
    def pools_for(self, route: Route) -> list[ModelPool]:
        return [pool for model in route.models if (pool := self._pools.get(model)) is not None]

    def decide(self, route: Route, exclude: frozenset[str] | set[str]) -> Decision:
        decision = choose(self.pools_for(route), route, exclude, time.monotonic(), self._rng)
        if isinstance(decision, Picked) and not decision.explored:
            pool = self._pools.get(decision.model)
            if pool is not None and len(pool.free) > SCAN_LIMIT:
                pool.hot.append(decision.device)
        return decision

    def check(self, route: Route) -> list[ModelPool]:
        """The pools a request could use, or the error that says why none can (fail fast).

        Cheap for the common case; raises ``ModelWarming`` when no device has any of the
        route's models and ``NoDeviceMatches`` when the constraints leave no device.
        """
        pools = self.pools_for(route)
        if not pools:
            raise self._warming_error(route.models)
        for pool in pools:
            for device in pool.free:
                if failed_constraint(device, pool, route) == PASS:
                    return pools
                break  # one look at the free set: the full answer is choose's job
        decision = choose(pools, route, frozenset(), time.monotonic(), self._rng)
        if isinstance(decision, Rejected):
            raise NoDeviceMatches(decision.message, param=decision.param, code=decision.code)
        return pools

    def _warming_error(self, models: tuple[str, ...]) -> ModelWarming:
        named = ", ".join(repr(m) for m in models) or "any model"
        downloading = sum(self.warming_count(model) for model in models)
        if downloading:
            return ModelWarming(
                f"Model {named} is being downloaded by {downloading} device(s) and is "
                "not servable yet. Retry shortly.",
                retry_after=self._downloading_retry_after_s,
            )
        return ModelWarming(
            f"No device has model {named} loaded right now. Retry later.",
            retry_after=self._warming_retry_after_s,
        )

    # -- slots ----------------------------------------------------------------------
    async def reserve(
        self, route: Route, exclude: frozenset[str] | set[str], wait_s: float
    ) -> tuple[DeviceConnection, str] | None:
        """A device with a free slot (and the model it serves the request with), waiting
        up to ``wait_s`` when every eligible device is busy.

        Returns None when no untried device can take the request. Raises ``ModelWarming``
        when no device has any of its models, ``NoDeviceMatches`` when the request's
        constraints leave no device, and ``DevicesBusy`` when the wait ran out or the
        queue is full.
        """
        if not self.pools_for(route):
            raise self._warming_error(route.models)
        deadline = time.monotonic() + wait_s
        while True:
            decision = self.decide(route, exclude)
            if isinstance(decision, Picked):
                return decision.device, decision.model
            if isinstance(decision, Rejected):
                if exclude:
                    return None  # the untried devices cannot take it: failover is over
                raise NoDeviceMatches(decision.message, param=decision.param, code=decision.code)
            key = decision.models[0]
            waiters = self._waiters.setdefault(key, deque())
            remaining = deadline - time.monotonic()
            if remaining <= 0 or len(waiters) >= self._max_waiters:
                raise DevicesBusy(
                    f"Every device able to serve {key!r} is busy. Retry shortly.", retry_after=1
                )
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            waiters.append(future)
            try:
                await asyncio.wait_for(future, remaining)
            except TimeoutError:
                pass
            finally:
                if not future.done():
                    future.cancel()
                with contextlib.suppress(ValueError):
                    waiters.remove(future)

    def set_paused(self, device: DeviceConnection, paused: bool, reason: str | None) -> bool:
        """Pauses or resumes a device as its node reported (a pause takes no new jobs;
        running ones finish); True when its paused state changed."""
        if paused and device.state in (ConnectionState.READY, ConnectionState.BUSY):
            device.pause_reason = reason or "paused by the device"
            device.transition(ConnectionState.PAUSED)
            return True
        if paused and device.state is ConnectionState.PAUSED:
            device.pause_reason = reason or device.pause_reason  # e.g. a second rule
        elif not paused and device.state is ConnectionState.PAUSED:
            device.pause_reason = None
            device.transition(
                ConnectionState.READY if device.free_slots > 0 else ConnectionState.BUSY
            )
            self.slot_freed(device)
            return True
        return False

    def slot_freed(self, device: DeviceConnection) -> None:
        self._wake(device.models, limit=device.free_slots)

    def _wake(self, models: Iterable[str], limit: int | None = None) -> None:
        for model in models:
            waiters = self._waiters.get(model)
            woken = 0
            while waiters and (limit is None or woken < limit):
                future = waiters.popleft()
                if not future.done():
                    future.set_result(None)
                    woken += 1


_FREE = Pricing(input_per_1m_micros=0, output_per_1m_micros=0)
