"""The gateway's book of device profiles: loaded at connect, scored, suspected, saved.

One ``DeviceProfile`` per device id lives here for the gateway's lifetime, so a device
that reconnects keeps its measured speed, its cooldown and its record. Counters that
feed the trust score are written back to the ``devices`` row by a periodic flush of
the profiles that changed; a suspension, a clearance or a verification is written at
once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from datetime import UTC, datetime

from sqlalchemy import RowMapping, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from swarmgate.catalog import Catalog, Pricing
from swarmgate.errors import NotFound, RequestError
from swarmgate.routing.choice import TRUSTED_ABOVE
from swarmgate.routing.dispatch import Observer
from swarmgate.routing.profile import DeviceProfile
from swarmgate.routing.registry import DeviceConnection, DeviceRegistry
from swarmgate.store.tables import device_prices, devices
from swarmgate.trust.score import SUSPEND_AT, SUSPICIONS, trust_score

log = logging.getLogger("swarmgate.trust")

# Speed is judged only on answers long enough to measure.
MIN_TOKENS_FOR_SPEED = 16


def _utcnow() -> datetime:
    return datetime.now(UTC)


class TrustBook(Observer):
    def __init__(
        self,
        engine: AsyncEngine,
        registry: DeviceRegistry,
        catalog: Catalog,
        *,
        max_tokens_per_s: float = 5_000.0,
        abort_streak: int = 5,
        attestation_valid_s: float = 7 * 86_400,
        price_min_bps: int = 5_000,
        price_max_bps: int = 20_000,
        flush_interval_s: float = 5.0,
    ) -> None:
        self._engine = engine
        self._registry = registry
        self._catalog = catalog
        self._max_tokens_per_s = max_tokens_per_s
        self._abort_streak = abort_streak
        self._attestation_valid_s = attestation_valid_s
        self.price_min_bps = price_min_bps
        self.price_max_bps = price_max_bps
        self._flush_interval_s = flush_interval_s
        self.profiles: dict[str, DeviceProfile] = {}
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._flush_loop(), name="trust-flush")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self._flush_interval_s)
            self.expire_attestations(time.time())
            try:
                await self.flush()
            except Exception:
                log.exception("saving device profiles failed")

    # -- loading and saving -------------------------------------------------------------
    async def profile_for(self, device_id: str, account_id: str, engine: str) -> DeviceProfile:
        """The device's profile: the one in memory, or a new one from its row."""
        profile = self.profiles.get(device_id)
        if profile is None:
            profile = DeviceProfile(device_id=device_id, account_id=account_id)
            async with self._engine.connect() as conn:
                row = (await conn.execute(select(devices).where(devices.c.id == device_id))).first()
                prices = (
                    await conn.execute(
                        select(device_prices).where(device_prices.c.device_id == device_id)
                    )
                ).all()
            if row is not None:
                self._apply_row(profile, row._mapping)
            for price in prices:
                profile.prices[price.model] = Pricing(
                    input_per_1m_micros=price.input_per_1m_micros,
                    output_per_1m_micros=price.output_per_1m_micros,
                )
            self.profiles.setdefault(device_id, profile)
            profile = self.profiles[device_id]
        if profile.engine != engine:
            profile.engine = engine
            profile.dirty = True
        self.rescore(profile)
        return profile

    def _apply_row(self, profile: DeviceProfile, row: RowMapping) -> None:
        get = row.__getitem__
        created: datetime | None = get("created_at")
        if created is not None:
            if created.tzinfo is None:
                created = created.replace(tzinfo=UTC)
            profile.registered_at = created.timestamp()
        profile.jobs_served = get("jobs_served") or 0
        profile.jobs_failed = get("jobs_failed") or 0
        profile.canaries_passed = get("canaries_passed") or 0
        profile.canaries_failed = get("canaries_failed") or 0
        profile.suspicions = get("suspicions") or 0
        profile.last_suspicion = get("last_suspicion")
        profile.suspended_reason = get("suspended_reason")
        verified_by: str | None = get("verified_by")
        verified_at: datetime | None = get("verified_at")
        if verified_at is not None and verified_at.tzinfo is None:
            verified_at = verified_at.replace(tzinfo=UTC)
        profile.verified_by = verified_by
        profile.verified_until = None
        if verified_by is not None and verified_by != "admin" and verified_at is not None:
            profile.verified_until = verified_at.timestamp() + self._attestation_valid_s
        profile.verified = verified_by == "admin" or (
            profile.verified_until is not None and profile.verified_until > time.time()
        )

    async def flush(self) -> None:
        dirty = [p for p in self.profiles.values() if p.dirty]
        if not dirty:
            return
        for profile in dirty:
            profile.dirty = False
            self.rescore(profile)
        try:
            async with self._engine.begin() as conn:
                for profile in dirty:
                    await conn.execute(
                        update(devices)
                        .where(devices.c.id == profile.device_id)
                        .values(
                            engine=profile.engine,
                            jobs_served=profile.jobs_served,
                            jobs_failed=profile.jobs_failed,
                            canaries_passed=profile.canaries_passed,
                            canaries_failed=profile.canaries_failed,
                            suspicions=profile.suspicions,
                            last_suspicion=profile.last_suspicion,
                            trust_score=profile.trust,
                        )
                    )
        except BaseException:
            for profile in dirty:
                profile.dirty = True
            raise

    # -- scoring ------------------------------------------------------------------------
    def rescore(self, profile: DeviceProfile) -> float:
        trusted = profile.trust > TRUSTED_ABOVE
        profile.trust = trust_score(profile, time.time())
        if (profile.trust > TRUSTED_ABOVE) != trusted:
            self._reindex(profile.device_id)  # into or out of the trusted index
        return profile.trust

    def succeeded(
        self,
        device: DeviceConnection,
        model: str,
        ttft_ms: float | None,
        tokens: int,
        gen_s: float,
        total_s: float,
    ) -> None:
        profile = device.profile
        profile.observe_success(model, ttft_ms, tokens, gen_s)
        # Over the whole attempt (first token included): a lower bound on the true speed,
        # so only a device faster than any real one for this model is suspected.
        if (
            profile.engine != "sim"
            and tokens >= MIN_TOKENS_FOR_SPEED
            and total_s > 0
            and tokens / total_s > self._max_tokens_per_s
        ):
            self.suspect(device.profile, "too_fast")
        # The score moves by a hair per job: it is recomputed when the profiles are saved
        # (every few seconds), not on the request path.

    def failed(self, device: DeviceConnection, model: str, outcome: str, now: float) -> None:
        super().failed(device, model, outcome, now)
        profile = device.profile
        if outcome == "failed" and profile.consecutive_failures % self._abort_streak == 0:
            self.suspect(profile, "aborted_jobs")

    def canary_result(self, profile: DeviceProfile, passed: bool) -> None:
        if passed:
            profile.canaries_passed += 1
        else:
            profile.canaries_failed += 1
            self.suspect(profile, "canary_failed")
        profile.dirty = True
        self.rescore(profile)

    def suspect(self, profile: DeviceProfile, reason: str) -> None:
        """One suspicion event; at ``SUSPEND_AT`` the device stops getting jobs."""
        assert reason in SUSPICIONS, reason
        profile.suspicions += 1
        profile.last_suspicion = reason
        profile.dirty = True
        log.warning(
            "device suspected",
            extra={
                "device_id": profile.device_id,
                "reason": reason,
                "suspicions": profile.suspicions,
            },
        )
        if profile.suspicions >= SUSPEND_AT and profile.suspended_reason is None:
            profile.suspended_reason = f"{reason}: {SUSPICIONS[reason]}"
            self._reindex(profile.device_id)
            log.warning(
                "device suspended", extra={"device_id": profile.device_id, "reason": reason}
            )
            task = asyncio.get_event_loop().create_task(self._save_status(profile))
            task.add_done_callback(_log_failure)
        self.rescore(profile)

    def _reindex(self, device_id: str) -> None:
        connection = self._registry.get(device_id)
        if connection is not None:
            connection.reindex()
            self._registry.slot_freed(connection)

    async def _save_status(self, profile: DeviceProfile) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                update(devices)
                .where(devices.c.id == profile.device_id)
                .values(
                    suspended_reason=profile.suspended_reason,
                    suspended_at=_utcnow() if profile.suspended_reason else None,
                    suspicions=profile.suspicions,
                    last_suspicion=profile.last_suspicion,
                    verified_by=profile.verified_by,
                    trust_score=profile.trust,
                )
            )

    # -- admin and attestation ----------------------------------------------------------
    async def known(self, device_id: str) -> DeviceProfile:
        profile = self.profiles.get(device_id)
        if profile is not None:
            return profile
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(devices).where(devices.c.id == device_id))).first()
        if row is None:
            raise NotFound(f"No device {device_id!r}.")
        return await self.profile_for(device_id, row.account_id, row.engine or "unknown")

    def expire_attestations(self, now_unix: float) -> list[str]:
        """Devices whose attestation ran out are no longer verified (they may attest again)."""
        expired = []
        for profile in self.profiles.values():
            until = profile.verified_until
            if profile.verified and until is not None and until <= now_unix:
                profile.verified = False
                self.rescore(profile)
                self._reindex(profile.device_id)
                expired.append(profile.device_id)
        return expired

    async def clear(self, device_id: str) -> DeviceProfile:
        """An admin's clearance: suspicions forgiven, the device routable again."""
        profile = await self.known(device_id)
        profile.suspicions = 0
        profile.last_suspicion = None
        profile.suspended_reason = None
        self.rescore(profile)
        await self._save_status(profile)
        self._reindex(device_id)
        return profile

    async def mark_verified(self, device_id: str, by: str, verified: bool = True) -> DeviceProfile:
        profile = await self.known(device_id)
        profile.verified = verified
        profile.verified_by = by if verified else None
        profile.verified_until = (
            time.time() + self._attestation_valid_s if verified and by != "admin" else None
        )
        self.rescore(profile)
        self._reindex(device_id)
        async with self._engine.begin() as conn:
            await conn.execute(
                update(devices)
                .where(devices.c.id == device_id)
                .values(
                    verified_by=profile.verified_by,
                    verified_at=_utcnow() if verified else None,
                    trust_score=profile.trust,
                )
            )
        return profile

    # -- providers' prices --------------------------------------------------------------
    def price_bounds(self, model: str) -> tuple[Pricing, Pricing]:
        entry = self._catalog.get(model)
        if entry is None:
            raise RequestError(f"The model '{model}' is not in the catalog.", param="model")
        base = entry.pricing

        def scaled(bps: int) -> Pricing:
            return Pricing(
                input_per_1m_micros=base.input_per_1m_micros * bps // 10_000,
                output_per_1m_micros=base.output_per_1m_micros * bps // 10_000,
            )

        return scaled(self.price_min_bps), scaled(self.price_max_bps)

    async def set_prices(
        self, device_id: str, prices: Iterable[tuple[str, Pricing | None]]
    ) -> None:
        """Sets (or, with None, resets to the catalog's) the device's price per model."""
        profile = await self.known(device_id)
        rows: list[tuple[str, Pricing | None]] = []
        for model, price in prices:
            if price is not None:
                low, high = self.price_bounds(model)
                for part in ("input_per_1m_micros", "output_per_1m_micros"):
                    value = getattr(price, part)
                    if not getattr(low, part) <= value <= getattr(high, part):
                        raise RequestError(
                            f"{part} for '{model}' must be within {getattr(low, part)}.."
                            f"{getattr(high, part)} (the gateway's bounds), got {value}.",
                            param=f"prices.{model}.{part}",
                        )
            else:
                self.price_bounds(model)
            rows.append((model, price))
        now = _utcnow()
        async with self._engine.begin() as conn:
            for model, price in rows:
                await conn.execute(
                    device_prices.delete().where(
                        (device_prices.c.device_id == device_id) & (device_prices.c.model == model)
                    )
                )
                if price is not None:
                    await conn.execute(
                        device_prices.insert().values(
                            device_id=device_id,
                            model=model,
                            input_per_1m_micros=price.input_per_1m_micros,
                            output_per_1m_micros=price.output_per_1m_micros,
                            updated_at=now,
                        )
                    )
        for model, price in rows:
            if price is None:
                profile.prices.pop(model, None)
            else:
                profile.prices[model] = price


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("saving a device's status failed", exc_info=task.exception())
