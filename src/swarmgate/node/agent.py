"""The device agent: keeps one WebSocket to the gateway and runs the jobs it is sent.

It reconnects with jittered exponential backoff when the gateway goes away. When asked
to stop it drains: it tells the gateway it is pausing, lets running jobs finish (up to
a limit), then closes. It never logs prompt or completion text.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import platform
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import orjson
import psutil
import websockets
from pydantic import ValidationError
from websockets.asyncio.client import ClientConnection

from swarmgate import __version__
from swarmgate.node.backends.base import (
    Backend,
    BackendError,
    DropConnection,
    Finished,
    GenerationRequest,
    TokenDelta,
)
from swarmgate.protocol import (
    CLOSE_UNAUTHORIZED,
    CLOSE_UNSUPPORTED_VERSION,
    PROTOCOL_VERSION,
    Cancel,
    DeviceFacts,
    JobFrame,
    LoadedModel,
    Welcome,
    gateway_frame_adapter,
)

if TYPE_CHECKING:
    from swarmgate.node.guard import DeviceGuard

log = logging.getLogger("swarmgate.node")

# Non-streamed jobs send their text in one frame at the end, but a long generation still
# sends what it has every so often, so the gateway can tell a slow device from a dead one.
PROGRESS_INTERVAL_S = 1.0
FATAL_CLOSE_CODES = frozenset({CLOSE_UNAUTHORIZED, CLOSE_UNSUPPORTED_VERSION})


class FatalConnectionError(Exception):
    """The gateway refused this node for a reason retrying will not fix."""


def local_device_facts() -> DeviceFacts:
    return DeviceFacts(
        os=f"{platform.system()} {platform.release()}"[:200],
        cpu=(platform.processor() or platform.machine() or "unknown")[:200]
        + f" ({os.cpu_count() or 1} cores)",
        ram_mb=psutil.virtual_memory().total // (1024 * 1024),
        accelerator=None,
    )


def backoff_delay(attempt: int, low: float, high: float, rng: random.Random) -> float:
    """Full jitter: uniform between ``low`` and an exponentially growing cap."""
    cap = min(high, low * 2**attempt)
    return rng.uniform(low, max(low, cap))


@dataclass
class NodeStats:
    connected: bool = False
    device_id: str | None = None
    sessions: int = 0
    jobs_done: int = 0
    jobs_failed: int = 0
    models: list[str] = field(default_factory=list)


class NodeAgent:
    def __init__(
        self,
        *,
        gateway_url: str,
        token: str,
        backend: Backend,
        models: list[str],
        slots: int = 1,
        region: str = "local",
        facts: DeviceFacts | None = None,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
        drain_timeout_s: float = 30.0,
        guard: DeviceGuard | None = None,
    ) -> None:
        self.gateway_url = gateway_url
        self.token = token
        self.backend = backend
        self.model_ids = models
        self.slots = slots
        self.region = region
        self.facts = facts or local_device_facts()
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = reconnect_max_s
        self.drain_timeout_s = drain_timeout_s
        # Pauses the node while the device is low on battery, hot or outside its hours.
        self.guard = guard
        self.stats = NodeStats()
        self.loaded: list[LoadedModel] = []
        self.connected = asyncio.Event()
        self._jobs: dict[str, asyncio.Task[None]] = {}
        self._send_lock = asyncio.Lock()
        self._draining = False
        self._ws: ClientConnection | None = None
        # Models being downloaded or loaded → progress (0..1, or None when unknown).
        self.warming: dict[str, float | None] = {}
        self._rng = random.Random()

    # -- lifecycle ----------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Serves until ``stop`` is set; reconnects on its own until then."""
        self.loaded = await self.backend.load(self.model_ids)
        self.stats.models = [m.id for m in self.loaded]
        failures = 0
        guarding: asyncio.Task[None] | None = None
        if self.guard is not None:
            await self.guard.check()  # so the first heartbeat already tells the truth
            guarding = asyncio.create_task(self.guard.run(), name="device-guard")
        try:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    await self._session(stop)
                except FatalConnectionError:
                    raise
                except (OSError, websockets.exceptions.WebSocketException, TimeoutError) as exc:
                    log.warning("gateway connection lost: %s", type(exc).__name__)
                finally:
                    self._ws = None
                    self.connected.clear()
                    self.stats.connected = False
                if stop.is_set():
                    break
                failures = 0 if time.monotonic() - started > 30 else failures + 1
                delay = backoff_delay(
                    failures, self.reconnect_min_s, self.reconnect_max_s, self._rng
                )
                log.info("reconnecting in %.1f s", delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
        finally:
            if guarding is not None:
                guarding.cancel()
                await asyncio.gather(guarding, return_exceptions=True)
            await self.backend.close()

    async def _session(self, stop: asyncio.Event) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        async with websockets.connect(
            self.gateway_url,
            additional_headers=headers,
            max_size=16 * 1024 * 1024,
            compression=None,  # small, latency-bound frames: deflate costs more than it saves
            open_timeout=10,
            ping_interval=20,
            ping_timeout=20,
        ) as ws:
            welcome = await self._welcome(ws)
            self._ws = ws
            self.stats.sessions += 1
            self.stats.connected = True
            self.stats.device_id = welcome.device_id
            self.connected.set()
            log.info("connected to the gateway as device %s", welcome.device_id)
            beats = asyncio.create_task(self._heartbeats(ws, welcome.heartbeat_interval_s))
            reader = asyncio.create_task(self._read(ws))
            stopper = asyncio.create_task(stop.wait())
            try:
                done, _ = await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if stopper in done:
                    await self._drain(ws)
                    await ws.close(1000, "node stopping")
                elif reader.exception() is not None:
                    raise reader.exception()  # type: ignore[misc]
            finally:
                for task in (beats, reader, stopper):
                    task.cancel()
                await asyncio.gather(beats, reader, stopper, return_exceptions=True)
                await self._cancel_all()

    def _hello(self) -> str:
        return orjson.dumps(
            {
                "type": "hello",
                "protocol": PROTOCOL_VERSION,
                "node_version": __version__,
                "device": self.facts.model_dump(),
                "region": self.region,
                "engine": self.backend.name,
                "slots": self.slots,
                "models": [m.model_dump() for m in self.loaded],
            }
        ).decode()

    async def _welcome(self, ws: ClientConnection) -> Welcome:
        """Sends hello and waits for welcome. A refusal can arrive before hello is even sent
        (a wrong token is refused at once), so the send is watched for it too."""
        try:
            await ws.send(self._hello())
            raw = await asyncio.wait_for(ws.recv(), 15)
        except websockets.exceptions.ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd else None
            reason = exc.rcvd.reason if exc.rcvd else ""
            if code in FATAL_CLOSE_CODES:
                raise FatalConnectionError(f"gateway refused this node ({code}): {reason}") from exc
            raise
        frame = gateway_frame_adapter.validate_json(raw)
        if not isinstance(frame, Welcome):
            raise websockets.exceptions.InvalidMessage("expected welcome from the gateway")
        if frame.rejected_models:
            log.warning(
                "the gateway will not route these models (unknown id or artifact mismatch): %s",
                ", ".join(frame.rejected_models),
            )
        return frame

    async def _send(self, ws: ClientConnection, payload: dict[str, object]) -> None:
        async with self._send_lock:
            await ws.send(orjson.dumps(payload).decode())

    def _pause_reason(self) -> str | None:
        """Why this node takes no new jobs now, or None; draining comes first."""
        if self._draining:
            return "draining"
        if self.guard is not None and self.guard.paused:
            return (self.guard.reason or "paused by the device guard")[:200]
        return None

    def _heartbeat(self) -> dict[str, object]:
        reason = self._pause_reason()
        beat: dict[str, object] = {
            "type": "heartbeat",
            "active_jobs": len(self._jobs),
            "paused": reason is not None,
            "pause_reason": reason,
        }
        if self.guard is not None:
            readings = self.guard.readings
            beat["cpu_percent"] = readings.cpu_percent
            beat["temperature_c"] = readings.temperature_c
            beat["battery_percent"] = readings.battery_percent
        if self.warming:
            beat["warming"] = [
                {"id": model_id, "progress": progress}
                for model_id, progress in self.warming.items()
            ]
        return beat

    async def add_models(self, model_ids: list[str]) -> None:
        """Loads models that became available (e.g. a finished download) and tells the
        gateway at once; later hellos announce them too."""
        loaded = await self.backend.load(model_ids)
        known = {m.id for m in self.loaded}
        self.loaded = self.loaded + [m for m in loaded if m.id not in known]
        self.stats.models = [m.id for m in self.loaded]
        for model_id in model_ids:
            self.warming.pop(model_id, None)
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(websockets.exceptions.ConnectionClosed):
                await self._send(
                    ws, {"type": "models", "models": [m.model_dump() for m in self.loaded]}
                )
                await self._send(ws, self._heartbeat())

    async def _heartbeats(self, ws: ClientConnection, interval: float) -> None:
        while True:
            if self.guard is None:
                await self._send(ws, self._heartbeat())
                await asyncio.sleep(interval)
                continue
            # A pause or resume goes out at once, not at the next interval.
            self.guard.changed.clear()
            await self._send(ws, self._heartbeat())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.guard.changed.wait(), interval)

    async def _read(self, ws: ClientConnection) -> None:
        async for raw in ws:
            try:
                frame = gateway_frame_adapter.validate_json(raw)
            except ValidationError:
                log.warning("ignoring a frame this node does not understand")
                continue
            if isinstance(frame, JobFrame):
                self._start_job(ws, frame)
            elif isinstance(frame, Cancel):
                task = self._jobs.get(frame.job_id)
                if task is not None:
                    task.cancel()

    # -- jobs ---------------------------------------------------------------------------
    def _start_job(self, ws: ClientConnection, frame: JobFrame) -> None:
        paused = not self._draining and self.guard is not None and self.guard.paused
        if self._draining or paused or len(self._jobs) >= self.slots:
            code, reason = "NODE_BUSY", "no free slot"
            if self._draining:
                reason = "node is draining"
            elif paused:
                code, reason = "DEVICE_PAUSED", f"device paused: {self._pause_reason()}"
            asyncio.create_task(  # noqa: RUF006 - fire and forget; errors are logged by _send
                self._send(
                    ws,
                    {
                        "type": "error",
                        "job_id": frame.job_id,
                        "code": code,
                        "message": reason,
                    },
                )
            )
            return
        task = asyncio.create_task(self._run_job(ws, frame), name=f"job-{frame.job_id}")
        self._jobs[frame.job_id] = task
        task.add_done_callback(functools.partial(self._forget_job, frame.job_id))

    def _forget_job(self, job_id: str, _task: asyncio.Task[None]) -> None:
        self._jobs.pop(job_id, None)

    async def _run_job(self, ws: ClientConnection, frame: JobFrame) -> None:
        request = GenerationRequest(
            job_id=frame.job_id,
            model=frame.model,
            messages=list(frame.messages),
            params=frame.params,
            stream=frame.stream,
            continue_final=frame.continue_final,
        )
        pending: list[str] = []
        pending_tokens = 0
        sent_any = False
        last_flush = time.monotonic()
        try:
            async for event in self.backend.generate(request):
                if isinstance(event, TokenDelta):
                    if frame.stream:
                        await self._send(
                            ws,
                            {
                                "type": "delta",
                                "job_id": frame.job_id,
                                "text": event.text,
                                "tokens": event.tokens,
                            },
                        )
                        continue
                    pending.append(event.text)
                    pending_tokens += event.tokens
                    if time.monotonic() - last_flush >= PROGRESS_INTERVAL_S:
                        await self._send(
                            ws,
                            {
                                "type": "delta",
                                "job_id": frame.job_id,
                                "text": "".join(pending),
                                "tokens": pending_tokens,
                            },
                        )
                        pending, pending_tokens, sent_any = [], 0, True
                        last_flush = time.monotonic()
                elif isinstance(event, Finished):
                    done: dict[str, object] = {
                        "type": "done",
                        "job_id": frame.job_id,
                        "finish_reason": event.finish_reason,
                        "usage": {
                            "prompt_tokens": event.prompt_tokens,
                            "completion_tokens": event.completion_tokens,
                        },
                    }
                    if not frame.stream:
                        if sent_any:
                            if pending:
                                await self._send(
                                    ws,
                                    {
                                        "type": "delta",
                                        "job_id": frame.job_id,
                                        "text": "".join(pending),
                                        "tokens": pending_tokens,
                                    },
                                )
                        else:
                            done["text"] = "".join(pending)
                    await self._send(ws, done)
                    self.stats.jobs_done += 1
                    return
            raise BackendError("the backend ended without finishing the answer")
        except BackendError as exc:
            self.stats.jobs_failed += 1
            await self._send(
                ws,
                {
                    "type": "error",
                    "job_id": frame.job_id,
                    "code": exc.code,
                    "message": str(exc)[:500],
                },
            )
        except DropConnection:
            self.stats.jobs_failed += 1
            log.warning("dropping the gateway connection (simulated device death)")
            ws.transport.abort()
        except websockets.exceptions.ConnectionClosed:
            # The gateway went away mid-job; the reconnect loop takes it from here, and
            # the gateway fails the job over (or voids it) on its side.
            self.stats.jobs_failed += 1

    async def _cancel_all(self) -> None:
        tasks = list(self._jobs.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _drain(self, ws: ClientConnection) -> None:
        """Stops taking jobs, tells the gateway, and gives running jobs time to finish."""
        self._draining = True
        with contextlib.suppress(Exception):
            await self._send(
                ws,
                {
                    "type": "heartbeat",
                    "active_jobs": len(self._jobs),
                    "paused": True,
                    "pause_reason": "draining",
                },
            )
        running = list(self._jobs.values())
        if not running:
            return
        log.info("waiting for %d running job(s) to finish", len(running))
        await asyncio.wait(running, timeout=self.drain_timeout_s)
        # Whatever is still running fails cleanly, so the gateway can retry it elsewhere.
        for job_id, task in list(self._jobs.items()):
            if task.done():
                continue
            with contextlib.suppress(Exception):
                await self._send(
                    ws,
                    {
                        "type": "error",
                        "job_id": job_id,
                        "code": "NODE_STOPPING",
                        "message": "the node is shutting down",
                    },
                )
            task.cancel()
        await self._cancel_all()
