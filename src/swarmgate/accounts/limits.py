"""Per-key rate limits: requests per minute and tokens per minute, as token buckets.

A bucket holds up to ``capacity`` units and refills at ``capacity / 60`` units per
second, so a key may burst up to its whole minute's allowance and then runs at the
steady rate. A request takes one unit from the key's request bucket and, from its
token bucket, the most tokens it can use (prompt bound + ``max_tokens``); what it did
not use goes back when it finishes. An empty bucket answers 429 RATE_LIMIT_EXCEEDED with
the seconds until enough has refilled.

These buckets live in this process; the scale-out mode keeps the same arithmetic in
Redis (``cluster/limits.py``), behind the ``Limiter`` calls.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from swarmgate.accounts.keys import KeySettings
from swarmgate.errors import RateLimited


@dataclass(slots=True)
class TokenBucket:
    capacity: int
    tokens: float
    updated: float

    @classmethod
    def full(cls, capacity: int, now: float) -> TokenBucket:
        return cls(capacity=capacity, tokens=float(capacity), updated=now)

    @property
    def rate_per_s(self) -> float:
        return self.capacity / 60.0

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate_per_s)
            self.updated = now

    def wait_s(self, amount: int, now: float) -> float:
        """Seconds until ``amount`` units are there (0: they are there now)."""
        self._refill(now)
        deficit = amount - self.tokens
        return 0.0 if deficit <= 0 else deficit / self.rate_per_s

    def take(self, amount: int) -> None:
        self.tokens -= amount

    def give_back(self, amount: int, now: float) -> None:
        self._refill(now)
        self.tokens = min(self.capacity, self.tokens + amount)


@dataclass(slots=True)
class Admission:
    """What a request took from its key's buckets; returned in part when it ends."""

    key_id: str | None
    tokens_taken: int = 0


def rate_limited(settings: KeySettings, retry_after: int) -> RateLimited:
    """The 429 for a key over its limits, naming them."""
    which = []
    if settings.rpm_limit is not None:
        which.append(f"{settings.rpm_limit} requests")
    if settings.tpm_limit is not None:
        which.append(f"{settings.tpm_limit} tokens")
    return RateLimited(
        f"Rate limit exceeded for this key ({' and '.join(which)} per minute). "
        f"Retry after {retry_after} seconds.",
        retry_after=retry_after,
    )


class Limiter(Protocol):
    async def admit(self, key_id: str | None, settings: KeySettings, tokens: int) -> Admission:
        """Takes one request and up to ``tokens`` tokens, or raises RateLimited taking none."""

    def finish(self, admission: Admission, tokens_used: int) -> None:
        """Gives back the tokens a request took but did not use; once per admission.
        Never blocks: a shared store is updated in the background."""


class RateLimiter:
    """Token buckets per key, in this process."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._requests: dict[str, TokenBucket] = {}
        self._tokens: dict[str, TokenBucket] = {}
        self._now = clock

    def _bucket(self, buckets: dict[str, TokenBucket], key_id: str, capacity: int) -> TokenBucket:
        bucket = buckets.get(key_id)
        if bucket is None or bucket.capacity != capacity:  # new key, or its limit changed
            bucket = TokenBucket.full(capacity, self._now())
            buckets[key_id] = bucket
        return bucket

    async def admit(self, key_id: str | None, settings: KeySettings, tokens: int) -> Admission:
        """Takes one request and up to ``tokens`` tokens, or raises RateLimited taking none."""
        if key_id is None or (settings.rpm_limit is None and settings.tpm_limit is None):
            return Admission(key_id)
        now = self._now()
        requests = tokens_bucket = None
        wait = 0.0
        if settings.rpm_limit is not None:
            requests = self._bucket(self._requests, key_id, settings.rpm_limit)
            wait = requests.wait_s(1, now)
        taken = 0
        if settings.tpm_limit is not None:
            tokens_bucket = self._bucket(self._tokens, key_id, settings.tpm_limit)
            # A request bigger than the whole minute's allowance waits for a full bucket.
            taken = min(tokens, settings.tpm_limit)
            wait = max(wait, tokens_bucket.wait_s(taken, now))
        if wait > 0:
            raise rate_limited(settings, max(1, math.ceil(wait)))
        if requests is not None:
            requests.take(1)
        if tokens_bucket is not None:
            tokens_bucket.take(taken)
        return Admission(key_id, taken)

    def finish(self, admission: Admission, tokens_used: int) -> None:
        """Gives back the tokens a request took but did not use; once per admission."""
        unused = admission.tokens_taken - tokens_used
        admission.tokens_taken = 0
        if admission.key_id is None or unused <= 0:
            return
        bucket = self._tokens.get(admission.key_id)
        if bucket is not None:
            bucket.give_back(unused, self._now())
