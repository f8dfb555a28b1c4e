"""The gateway's long-lived parts, built once at start-up and handed to the routers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from sqlalchemy.ext.asyncio import AsyncEngine

from swarmgate.accounts.keys import KeyVerifier
from swarmgate.catalog import Catalog
from swarmgate.config import GatewaySettings
from swarmgate.protocol import CLOSE_HEARTBEAT_TIMEOUT
from swarmgate.routing.background import BackgroundJobs
from swarmgate.routing.dispatch import DispatchPolicy, Execution, JobSpec
from swarmgate.routing.joblog import JobLog
from swarmgate.routing.registry import DeviceRegistry
from swarmgate.store.db import create_engine, migrate

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
        self.registry = DeviceRegistry(warming_retry_after_s=settings.warming_retry_after_s)
        self.verifier = KeyVerifier(self.engine, ttl_s=settings.key_cache_ttl_s)
        self.policy = DispatchPolicy(
            max_retries=settings.max_retries,
            retry_backoff_s=settings.retry_backoff_ms / 1000,
            failover_budget_s=settings.failover_budget_s,
            queue_wait_s=settings.queue_wait_s,
            first_token_timeout_s=settings.first_token_timeout_s,
            token_stall_timeout_s=settings.token_stall_timeout_s,
        )
        self.job_log = JobLog(self.engine, settings.job_log_flush_ms / 1000)
        self.background = BackgroundJobs(self.engine, self.execution)
        self.ready = False
        self._tasks: list[asyncio.Task[None]] = []

    def execution(self, spec: JobSpec) -> Execution:
        return Execution(spec=spec, registry=self.registry, policy=self.policy)

    async def start(self) -> None:
        await migrate(self.engine)
        self.job_log.start()
        await self.background.start()
        self._tasks = [
            asyncio.create_task(self._watch_heartbeats(), name="heartbeat-watch"),
            asyncio.create_task(self._flush_key_use(), name="key-use-flush"),
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
        for device in self.registry.devices():
            device.close("gateway shutting down")
        await self.job_log.close()
        with contextlib.suppress(Exception):
            await self.verifier.flush_last_used()
        await self.engine.dispose()

    async def _watch_heartbeats(self) -> None:
        interval = self.settings.heartbeat_interval_s
        limit = self.settings.heartbeat_timeout_s
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for device in self.registry.devices():
                if now - device.last_seen > limit:
                    log.warning(
                        "device missed its heartbeats", extra={"device_id": device.device_id}
                    )
                    device.close_code = CLOSE_HEARTBEAT_TIMEOUT
                    device.close("heartbeat timeout")
                    self.registry.remove(device)

    async def _flush_key_use(self) -> None:
        while True:
            await asyncio.sleep(30)
            try:
                await self.verifier.flush_last_used()
            except Exception:
                log.exception("recording key use failed")
