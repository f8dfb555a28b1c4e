"""Connected devices, indexed by model, with slot accounting and a bounded wait queue.

The registry is in-process here; the scale-out mode puts presence in Redis behind
the same calls. Choosing among candidates is the pure ``pick_device``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

from swarmgate.errors import DeviceGone, DevicesBusy, ModelWarming
from swarmgate.protocol import Delta, Done, JobError
from swarmgate.routing.states import ConnectionState, check_connection_transition


@dataclass(frozen=True, slots=True)
class DeviceLost:
    """Put on an attempt's channel when its device's connection ends."""

    reason: str


# What an attempt's channel can receive: frames from the device, or word that it is gone.
AttemptEvent = Delta | Done | JobError | DeviceLost


# Decaying averages: recent behaviour counts most, one outlier does not dominate.
_EWMA_ALPHA = 0.2
_COOLDOWN_BASE_S = 2.0
_COOLDOWN_CAP_S = 60.0


@dataclass(eq=False)
class DeviceConnection:
    device_id: str
    account_id: str
    region: str
    slots: int
    models: frozenset[str]
    send_text: Callable[[str], Awaitable[None]]
    node_version: str = ""
    state: ConnectionState = ConnectionState.CONNECTING
    pause_reason: str | None = None
    # Attempt id → the channel its frames go to.
    active: dict[str, asyncio.Queue[AttemptEvent]] = field(default_factory=dict)
    # Frames for the device leave through one writer task, so sends never interleave.
    outbox: asyncio.Queue[str | None] = field(default_factory=asyncio.Queue)
    # Attempt ids this device was given that have since ended; late frames for them are dropped.
    recent: deque[str] = field(default_factory=lambda: deque(maxlen=256))
    last_seen: float = field(default_factory=time.monotonic)
    connected_at: float = field(default_factory=time.monotonic)
    ewma_ttft_ms: float | None = None
    ewma_tokens_per_s: float | None = None
    jobs_served: int = 0
    consecutive_failures: int = 0
    cooldown_until: float = 0.0
    close_code: int = 1000
    close_reason: str = ""
    # Models the device is downloading or loading; they make a request "warming", not lost.
    warming: frozenset[str] = frozenset()

    def transition(self, target: ConnectionState) -> None:
        check_connection_transition(self.state, target)
        self.state = target

    def send(self, text: str) -> None:
        """Queues a frame for the device; raises DeviceGone once the connection is closed."""
        if self.state is ConnectionState.CLOSED:
            raise DeviceGone(f"device {self.device_id} is disconnected")
        self.outbox.put_nowait(text)

    def occupy(self, attempt_id: str, channel: asyncio.Queue[AttemptEvent]) -> None:
        self.active[attempt_id] = channel
        if self.state is ConnectionState.READY and self.free_slots <= 0:
            self.transition(ConnectionState.BUSY)

    def vacate(self, attempt_id: str) -> bool:
        if self.active.pop(attempt_id, None) is None:
            return False
        self.recent.append(attempt_id)
        if self.state is ConnectionState.BUSY and self.free_slots > 0:
            self.transition(ConnectionState.READY)
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
        return self.state in (ConnectionState.READY, ConnectionState.BUSY) and self.free_slots > 0

    def observe_success(self, ttft_ms: float | None, tokens: int, gen_s: float) -> None:
        self.jobs_served += 1
        self.consecutive_failures = 0
        self.cooldown_until = 0.0
        if ttft_ms is not None:
            self.ewma_ttft_ms = _ewma(self.ewma_ttft_ms, ttft_ms)
        if tokens > 1 and gen_s > 0:
            self.ewma_tokens_per_s = _ewma(self.ewma_tokens_per_s, tokens / gen_s)

    def observe_failure(self, now: float) -> None:
        self.consecutive_failures += 1
        backoff = _COOLDOWN_BASE_S * 2 ** (self.consecutive_failures - 1)
        self.cooldown_until = now + min(backoff, _COOLDOWN_CAP_S)


def _ewma(current: float | None, sample: float) -> float:
    return sample if current is None else current + _EWMA_ALPHA * (sample - current)


def pick_device(
    candidates: Iterable[DeviceConnection],
    exclude: frozenset[str] | set[str] = frozenset(),
    now: float | None = None,
) -> DeviceConnection | None:
    """Least loaded first, then fastest observed first token; devices cooling down after
    failures are used only when nothing else can take the job."""
    now = time.monotonic() if now is None else now
    best: DeviceConnection | None = None
    best_key: tuple[int, float, float] | None = None
    for device in candidates:
        if device.device_id in exclude or not device.accepting:
            continue
        cooling = 1 if device.cooldown_until > now else 0
        load = len(device.active) / device.slots
        ttft = device.ewma_ttft_ms if device.ewma_ttft_ms is not None else 0.0
        key = (cooling, load, ttft)
        if best_key is None or key < best_key:
            best, best_key = device, key
    return best


class DeviceRegistry:
    def __init__(
        self,
        max_waiters_per_model: int = 1024,
        warming_retry_after_s: int = 300,
        downloading_retry_after_s: int = 30,
    ) -> None:
        self._by_id: dict[str, DeviceConnection] = {}
        self._by_model: dict[str, set[DeviceConnection]] = {}
        self._warming: dict[str, set[str]] = {}
        self._waiters: dict[str, deque[asyncio.Future[None]]] = {}
        self._max_waiters = max_waiters_per_model
        self._warming_retry_after_s = warming_retry_after_s
        self._downloading_retry_after_s = downloading_retry_after_s

    # -- membership -------------------------------------------------------------------
    def add(self, device: DeviceConnection) -> DeviceConnection | None:
        """Registers a ready device; returns the connection it replaces, if any."""
        previous = self._by_id.get(device.device_id)
        if previous is not None:
            self.remove(previous)
        self._by_id[device.device_id] = device
        for model in device.models:
            self._by_model.setdefault(model, set()).add(device)
        self._wake(device.models)
        return previous

    def remove(self, device: DeviceConnection) -> None:
        if self._by_id.get(device.device_id) is device:
            del self._by_id[device.device_id]
            self.set_warming(device, frozenset())
        for model in device.models:
            members = self._by_model.get(model)
            if members is not None:
                members.discard(device)
                if not members:
                    del self._by_model[model]

    def update_models(self, device: DeviceConnection, models: frozenset[str]) -> None:
        """Re-indexes a connected device whose set of served models changed."""
        if self._by_id.get(device.device_id) is not device:
            return
        for model in device.models - models:
            members = self._by_model.get(model)
            if members is not None:
                members.discard(device)
                if not members:
                    del self._by_model[model]
        added = models - device.models
        device.models = models
        for model in added:
            self._by_model.setdefault(model, set()).add(device)
        self._wake(added)

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
        return bool(self._by_model.get(model))

    def model_counts(self) -> dict[str, int]:
        return {model: len(members) for model, members in self._by_model.items()}

    # -- slots ----------------------------------------------------------------------
    def try_reserve(
        self, model: str, exclude: frozenset[str] | set[str]
    ) -> DeviceConnection | None:
        return pick_device(self._by_model.get(model, ()), exclude)

    async def reserve(
        self, model: str, exclude: frozenset[str] | set[str], wait_s: float
    ) -> DeviceConnection | None:
        """A device with a free slot for ``model``, waiting up to ``wait_s`` when all are busy.

        Returns None when no untried device has the model; raises ``ModelWarming`` when no
        device has it at all and ``DevicesBusy`` when the wait ran out or the queue is full.
        """
        device = self.try_reserve(model, exclude)
        if device is not None:
            return device
        if not self._by_model.get(model):
            downloading = self.warming_count(model)
            if downloading:
                raise ModelWarming(
                    f"Model {model!r} is being downloaded by {downloading} device(s) and is "
                    "not servable yet. Retry shortly.",
                    retry_after=self._downloading_retry_after_s,
                )
            raise ModelWarming(
                f"No device has model {model!r} loaded right now. Retry later.",
                retry_after=self._warming_retry_after_s,
            )
        deadline = time.monotonic() + wait_s
        waiters = self._waiters.setdefault(model, deque())
        while True:
            members = self._by_model.get(model, set())
            if not any(d.device_id not in exclude for d in members):
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0 or len(waiters) >= self._max_waiters:
                raise DevicesBusy(
                    f"Every device serving {model!r} is busy. Retry shortly.", retry_after=1
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
            device = self.try_reserve(model, exclude)
            if device is not None:
                return device

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
