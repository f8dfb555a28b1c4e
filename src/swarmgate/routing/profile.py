"""What the gateway has learned about each device, kept by device id across reconnects.

A connection comes and goes; the profile stays: observed speed and success per model
(decaying averages), the failure cooldown, the device's own prices, and the inputs
of its trust score. Routing reads profiles; ``routing/dispatch.py`` and the canary
runner write them. Nothing here does IO — ``trust/book.py`` loads and saves them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from swarmgate.catalog import Pricing

# Decaying averages: recent behaviour counts most, one outlier does not dominate.
EWMA_ALPHA = 0.2
# Failure cooldown: base * 2^(strikes - 1), capped.
COOLDOWN_BASE_S = 2.0
COOLDOWN_CAP_S = 60.0
# A device's stats for a model are taken at their word after this many finished jobs;
# before that the device is "unmeasured" and gets an exploration share of traffic.
MEASURED_AFTER = 3


def ewma(current: float | None, sample: float) -> float:
    return sample if current is None else current + EWMA_ALPHA * (sample - current)


@dataclass(slots=True)
class ModelStats:
    """One device serving one model: decaying averages of what it did."""

    ttft_ms: float | None = None
    tokens_per_s: float | None = None
    success: float = 1.0  # decaying success rate, 1.0 until something fails
    samples: int = 0

    @property
    def measured(self) -> bool:
        return self.samples >= MEASURED_AFTER

    def succeeded(self, ttft_ms: float | None, tokens: int, gen_s: float) -> None:
        self.samples += 1
        self.success = ewma(self.success, 1.0)
        if ttft_ms is not None:
            self.ttft_ms = ewma(self.ttft_ms, ttft_ms)
        if tokens > 1 and gen_s > 0:
            self.tokens_per_s = ewma(self.tokens_per_s, tokens / gen_s)

    def failed(self) -> None:
        self.samples += 1
        self.success = ewma(self.success, 0.0)


@dataclass(eq=False, slots=True)
class DeviceProfile:
    device_id: str
    account_id: str
    # Unix seconds the device was registered: its tenure counts towards trust.
    registered_at: float = 0.0
    engine: str = "unknown"
    stats: dict[str, ModelStats] = field(default_factory=dict)
    # The provider's own price per model (within the gateway's bounds); else the catalog's.
    prices: dict[str, Pricing] = field(default_factory=dict)

    # failure cooldown (outlier ejection)
    consecutive_failures: int = 0
    strikes: int = 0  # cooldowns so far without a success in between
    cooldown_until: float = 0.0

    # trust inputs (persisted)
    jobs_served: int = 0
    jobs_failed: int = 0
    canaries_passed: int = 0
    canaries_failed: int = 0
    suspicions: int = 0
    last_suspicion: str | None = None
    verified: bool = False  # a valid attestation, or an admin said so
    verified_by: str | None = None  # "play_integrity", "admin", ...
    verified_until: float | None = None  # Unix seconds an attestation counts to; None: no end
    suspended_reason: str | None = None  # set: no routing until an admin clears it
    trust: float = 0.0
    # Changed since last saved.
    dirty: bool = False

    def model_stats(self, model: str) -> ModelStats:
        stats = self.stats.get(model)
        if stats is None:
            stats = self.stats[model] = ModelStats()
        return stats

    def price(self, model: str, default: Pricing) -> Pricing:
        return self.prices.get(model, default)

    def observe_success(self, model: str, ttft_ms: float | None, tokens: int, gen_s: float) -> None:
        self.model_stats(model).succeeded(ttft_ms, tokens, gen_s)
        self.jobs_served += 1
        self.consecutive_failures = 0
        self.strikes = 0
        self.cooldown_until = 0.0
        self.dirty = True

    def observe_failure(self, model: str, now: float) -> None:
        """A failed attempt: the device cools down for a while that grows with repeats."""
        self.model_stats(model).failed()
        self.jobs_failed += 1
        self.consecutive_failures += 1
        self.strikes += 1
        backoff = COOLDOWN_BASE_S * 2 ** min(self.strikes - 1, 16)
        self.cooldown_until = now + min(backoff, COOLDOWN_CAP_S)
        self.dirty = True

    def cooling(self, now: float) -> bool:
        return self.cooldown_until > now
