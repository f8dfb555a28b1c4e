"""The gateway's long-lived parts, built once at start-up and handed to the routers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncEngine

if TYPE_CHECKING:
    from swarmgate.cluster.mesh import Mesh
    from swarmgate.cluster.wallets import RedisWallets
    from swarmgate.tracing import Tracing
    from swarmgate.trust.attestation import NonceBook, Verifier

from swarmgate.accounts.jwt_auth import JwtVerifier
from swarmgate.accounts.keys import LIVE_PREFIX, TEST_PREFIX, KeyVerifier, Principal, parse_bearer
from swarmgate.accounts.limits import Limiter, RateLimiter
from swarmgate.accounts.signin import SESSION_PREFIX, SessionVerifier
from swarmgate.billing.service import Billing
from swarmgate.billing.settlement import PendingCharge
from swarmgate.catalog import Catalog, Pricing
from swarmgate.config import GatewaySettings
from swarmgate.dashboard.reports import NetworkStatusCache
from swarmgate.errors import AuthError
from swarmgate.memory.service import Memory
from swarmgate.metrics import Metrics
from swarmgate.protocol import CLOSE_HEARTBEAT_TIMEOUT
from swarmgate.routing.background import BackgroundJobs
from swarmgate.routing.dispatch import CloudPlan, DispatchPolicy, Execution, JobSpec
from swarmgate.routing.joblog import JobLog
from swarmgate.routing.registry import DeviceConnection, DeviceRegistry
from swarmgate.store.db import create_engine, migrate
from swarmgate.store.idempotency import Idempotency, IdempotencyStore
from swarmgate.trust.book import TrustBook
from swarmgate.trust.canary import CanaryRunner, CanarySet
from swarmgate.upstreams import Upstreams
from swarmgate.vault.crypto import VaultCipher
from swarmgate.vault.store import Vault
from swarmgate.webhooks.delivery import ChargeEvent, Webhooks
from swarmgate.workflows.store import WorkflowStore

log = logging.getLogger("swarmgate.gateway")


class Gateway:
    def __init__(self, settings: GatewaySettings, engine: AsyncEngine | None = None) -> None:
        self.settings = settings
        self.engine = engine or create_engine(settings.database_url)
        self.catalog = Catalog.load(settings.catalog_path)
        # Built once: what nodes need to fetch and verify each model's artifact.
        self.node_catalog = [
            {
                "id": model.id,
                "context_length": model.context_length,
                "artifact": model.artifact.model_dump() if model.artifact else None,
            }
            for model in self.catalog
        ]
        self.registry = DeviceRegistry(
            pricing_of=self._catalog_pricing,
            warming_retry_after_s=settings.warming_retry_after_s,
        )
        self.trust = TrustBook(
            self.engine,
            self.registry,
            self.catalog,
            max_tokens_per_s=settings.trust_max_tokens_per_s,
            abort_streak=settings.trust_abort_streak,
            attestation_valid_s=settings.attestation_valid_s,
            price_min_bps=settings.device_price_min_bps,
            price_max_bps=settings.device_price_max_bps,
        )
        self.verifier = KeyVerifier(self.engine, ttl_s=settings.key_cache_ttl_s)
        self.sessions = SessionVerifier(self.engine, ttl_s=settings.key_cache_ttl_s)
        self.jwt: JwtVerifier | None = None
        if settings.jwks_url or settings.jwks_file is not None:
            self.jwt = JwtVerifier(self.engine, settings)
        self.policy = DispatchPolicy(
            max_retries=settings.max_retries,
            retry_backoff_s=settings.retry_backoff_ms / 1000,
            failover_budget_s=settings.failover_budget_s,
            queue_wait_s=settings.queue_wait_s,
            first_token_timeout_s=settings.first_token_timeout_s,
            token_stall_timeout_s=settings.token_stall_timeout_s,
        )
        self.metrics = Metrics()
        self.job_log = JobLog(self.engine, settings.job_log_flush_ms / 1000, self.metrics)
        self.limiter: Limiter = RateLimiter()
        self.idempotency: Idempotency = IdempotencyStore(
            self.engine,
            ttl_s=settings.idempotency_ttl_s,
            takeover_after_s=settings.request_timeout_s,
        )
        # Scaled out: presence, cross-gateway dispatch, credit reservations, limits and
        # idempotency in Redis.
        self.mesh: Mesh | None = None
        wallets: RedisWallets | None = None
        if settings.redis_url:
            from swarmgate.cluster.idempotency import RedisIdempotencyStore
            from swarmgate.cluster.limits import RedisRateLimiter
            from swarmgate.cluster.mesh import Mesh
            from swarmgate.cluster.wallets import RedisWallets, reservation_ttl_s

            self.mesh = Mesh(settings, self.registry, self.trust.profile_for)
            wallets = RedisWallets(
                self.mesh.redis, self.mesh.keys, entry_ttl_s=reservation_ttl_s(settings)
            )
            self.limiter = RedisRateLimiter(self.mesh.redis, self.mesh.keys)
            self.idempotency = RedisIdempotencyStore(
                self.mesh.redis,
                self.mesh.keys,
                ttl_s=settings.idempotency_ttl_s,
                takeover_after_s=settings.request_timeout_s,
            )
        self.billing = Billing(
            self.engine,
            provider_share_bps=settings.provider_share_bps,
            hold_ttl_s=settings.hold_ttl_s,
            batch_max=settings.settle_batch_max,
            post_interval_s=settings.settle_post_interval_s,
            enabled=settings.billing_enabled,
            wallets=wallets,
        )
        self.background = BackgroundJobs(
            self.engine,
            self.execution,
            billing=self.billing,
            catalog=self.catalog,
            price_of=self.device_price,
            cloud_price=lambda model, byok: self.cloud_price(model, byok=byok),
        )
        self.canaries = CanaryRunner(
            self.registry,
            self.trust,
            self.execution,
            CanarySet.load(),
            interval_s=settings.canary_interval_s,
            max_per_round=settings.canary_max_per_round,
        )
        # Integrity attestation: off unless configured (the crypto loads only then).
        self.attestation: Verifier | None = None
        self.nonces: NonceBook | None = None
        if settings.play_integrity_package:
            from swarmgate.trust.attestation import NonceBook, PlayIntegrityVerifier

            self.nonces = NonceBook()
            self.attestation = PlayIntegrityVerifier.from_config(
                decryption_key_b64=settings.play_integrity_decryption_key,
                verification_key_b64=settings.play_integrity_verification_key,
                package_name=settings.play_integrity_package,
                certificate_digests=settings.play_integrity_certificate_digests,
            )
        self.upstreams = Upstreams(
            settings.upstreams, allow_private_urls=settings.vault_allow_private_urls
        )
        cipher = None
        if settings.vault_master_secret:
            cipher = VaultCipher(
                settings.vault_master_secret, key_version=settings.vault_key_version
            )
        self.vault = Vault(self.engine, cipher)
        self.webhooks = Webhooks(self.engine, settings)
        self.memory = Memory(self.engine, settings, self.catalog, self.registry)
        self.workflows = WorkflowStore(self.engine)
        self.network_status = NetworkStatusCache(self.engine, self.registry, self.catalog)
        # Device handshakes' database work, a few at a time (api/nodes.py).
        self.handshakes = asyncio.Semaphore(settings.device_handshake_concurrency)
        self.billing.listeners.append(self._charge_settled)
        # OpenTelemetry spans when tracing is on; set by create_asgi_app (api/app.py).
        self.tracing: Tracing | None = None
        self.ready = False
        self._tasks: list[asyncio.Task[None]] = []

    async def authenticate(self, authorization: str | None) -> Principal:
        """The caller behind an ``Authorization`` header: an API key, a session or a JWT."""
        token = parse_bearer(authorization)
        if token is None or token.startswith((LIVE_PREFIX, TEST_PREFIX)):
            return await self.verifier.verify(token)
        if token.startswith(SESSION_PREFIX):
            return await self.sessions.verify(token)
        if token.count(".") == 2:
            if self.jwt is None:
                raise AuthError("JWT bearer tokens are not accepted: this gateway has no JWKS.")
            return await self.jwt.verify(token)
        return await self.verifier.verify(token)

    def presence_changed(self, device: DeviceConnection) -> None:
        """A device connected here joined or changed what it offers (no-op when alone)."""
        if self.mesh is not None:
            self.mesh.device_changed(device)

    def presence_left(self, device: DeviceConnection) -> None:
        if self.mesh is not None:
            self.mesh.device_left(device)

    def _charge_settled(self, charge: PendingCharge, available_micros: int) -> None:
        """Every committed charge, as an event for the account's webhooks (O(1), no IO)."""
        self.metrics.charged(charge.charged_micros)
        if not self.webhooks.has_endpoints(charge.account_id):
            return
        self.webhooks.on_charge(
            ChargeEvent(
                account_id=charge.account_id,
                key_id=charge.key_id,
                job_id=charge.job_id,
                model=charge.model,
                prompt_tokens=charge.prompt_tokens,
                completion_tokens=charge.completion_tokens,
                cost_micros=charge.charged_micros,
                available_micros=available_micros,
                sandbox=charge.sandbox,
            )
        )

    def _catalog_pricing(self, model: str) -> Pricing | None:
        entry = self.catalog.get(model)
        return entry.pricing if entry is not None else None

    def device_price(self, device_id: str | None, model: str) -> Pricing:
        """What ``device_id`` charges for ``model``: its own price, else the catalog's."""
        entry = self.catalog.get(model)
        default = (
            entry.pricing
            if entry is not None
            else Pricing(input_per_1m_micros=0, output_per_1m_micros=0)
        )
        profile = self.trust.profiles.get(device_id) if device_id is not None else None
        return profile.price(model, default) if profile is not None else default

    def cloud_price(self, model: str, *, byok: bool) -> Pricing:
        """What a cloud answer costs the developer: the catalog's price, or with their own
        upstream key, only the platform's fee (``byok_fee_bps`` of it)."""
        entry = self.catalog.get(model)
        price = (
            entry.pricing
            if entry is not None
            else Pricing(input_per_1m_micros=0, output_per_1m_micros=0)
        )
        if not byok:
            return price
        bps = self.settings.byok_fee_bps
        return Pricing(
            input_per_1m_micros=price.input_per_1m_micros * bps // 10_000,
            output_per_1m_micros=price.output_per_1m_micros * bps // 10_000,
        )

    def cloud_plan(self, spec: JobSpec) -> CloudPlan | None:
        """How ``spec`` may use cloud upstreams: None for a p2p model, a private request,
        an internal job, or a model no configured upstream serves."""
        model = self.catalog.get(spec.model)
        if model is None or model.tier == "p2p" or spec.internal or spec.privacy_mode:
            return None
        if not self.upstreams.serves(model):
            return None
        account_id, vault = spec.account_id, self.vault

        async def vault_key(provider: str) -> tuple[str, str | None] | None:
            return await vault.key_for(account_id, provider)

        return CloudPlan(
            model=model,
            upstreams=self.upstreams,
            vault_key=vault_key,
            only=model.tier == "cloud",
            fallback=model.tier == "hybrid",
        )

    def execution(self, spec: JobSpec) -> Execution:
        tracing = self.tracing
        return Execution(
            spec=spec,
            registry=self.registry,
            policy=self.policy,
            observer=self.trust,
            cloud=self.cloud_plan(spec),
            # Canaries are not traced: every idle device gets them, around the clock.
            trace=None if tracing is None or spec.internal else tracing.job(spec),
        )

    async def start(self) -> None:
        await migrate(self.engine)
        await self.billing.start()
        await self.webhooks.start()
        self.job_log.start()
        self.trust.start()
        self.canaries.start()
        await self.background.start()
        self.memory.start()
        if self.mesh is not None:
            await self.mesh.start()
        self._tasks = [
            asyncio.create_task(self._watch_heartbeats(), name="heartbeat-watch"),
            asyncio.create_task(self._flush_key_use(), name="key-use-flush"),
            asyncio.create_task(self._sweep_holds(), name="hold-sweeper"),
        ]
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.background.stop()
        await self.canaries.stop()
        await self.memory.stop()
        for device in self.registry.devices():
            device.close("gateway shutting down")
        if self.mesh is not None:
            await self.mesh.stop()
        await self.billing.stop()  # every charge already queued is written
        await self.webhooks.stop()  # after billing: its last charges raise events too
        await self.job_log.close()
        await self.upstreams.aclose()
        with contextlib.suppress(Exception):
            await self.trust.stop()
        with contextlib.suppress(Exception):
            await self.verifier.flush_last_used()
        if self.jwt is not None:
            await self.jwt.aclose()
        await self.engine.dispose()

    async def _watch_heartbeats(self) -> None:
        interval = self.settings.heartbeat_interval_s
        limit = self.settings.heartbeat_timeout_s
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for device in self.registry.devices():
                if device.local and now - device.last_seen > limit:
                    log.warning(
                        "device missed its heartbeats", extra={"device_id": device.device_id}
                    )
                    device.close_code = CLOSE_HEARTBEAT_TIMEOUT
                    device.close("heartbeat timeout")
                    self.registry.remove(device)

    async def _sweep_holds(self) -> None:
        while True:
            try:
                await self.billing.sweep()
                await self.idempotency.purge_expired()
            except Exception:
                log.exception("sweeping expired holds and idempotency keys failed")
            await asyncio.sleep(self.settings.hold_sweep_interval_s)

    async def _flush_key_use(self) -> None:
        while True:
            await asyncio.sleep(30)
            try:
                await self.verifier.flush_last_used()
            except Exception:
                log.exception("recording key use failed")
