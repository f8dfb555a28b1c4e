"""``/v1/nodes/connect``: the WebSocket every device keeps open to its gateway."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable

from fastapi import APIRouter, WebSocket
from pydantic import ValidationError
from sqlalchemy import update
from starlette.responses import Response
from starlette.websockets import WebSocketDisconnect

from swarmgate.accounts.keys import parse_bearer, utcnow, verify_device_token
from swarmgate.api.deps import CurrentDevice, GatewayDep
from swarmgate.api.responses import json_response
from swarmgate.errors import ProtocolViolation
from swarmgate.gateway import Gateway
from swarmgate.protocol import (
    CLOSE_BAD_FRAME,
    CLOSE_FRAME_TOO_LARGE,
    CLOSE_GOING_AWAY,
    CLOSE_OUT_OF_ORDER,
    CLOSE_REPLACED,
    CLOSE_TRY_AGAIN_LATER,
    CLOSE_UNAUTHORIZED,
    CLOSE_UNSUPPORTED_VERSION,
    PROTOCOL_VERSION,
    Delta,
    Done,
    Heartbeat,
    Hello,
    JobError,
    LoadedModel,
    ModelsChanged,
    NodeFrameType,
    Welcome,
    node_frame_adapter,
)
from swarmgate.routing.registry import DeviceConnection
from swarmgate.routing.states import ConnectionState
from swarmgate.store.tables import devices

router = APIRouter(tags=["nodes"])
log = logging.getLogger("swarmgate.nodes")

HELLO_TIMEOUT_S = 10.0
HANDSHAKE_WAIT_S = 5.0  # the longest a handshake waits for its turn at the database
# A close frame's payload is at most 125 bytes: a 2-byte code and 123 bytes of UTF-8 reason.
MAX_CLOSE_REASON_BYTES = 123


def close_reason(reason: str) -> str:
    """``reason`` cut to fit a close frame, in bytes (it may echo what the node sent)."""
    return reason.encode()[:MAX_CLOSE_REASON_BYTES].decode(errors="ignore")


def _frame_size(raw: str | bytes) -> int:
    return len(raw) if isinstance(raw, bytes) else len(raw.encode())


def parse_frame(raw: str | bytes | None, limit: int) -> NodeFrameType:
    if raw is None:
        raise ProtocolViolation(CLOSE_BAD_FRAME, "empty frame")
    if len(raw) > limit or _frame_size(raw) > limit:
        raise ProtocolViolation(CLOSE_FRAME_TOO_LARGE, f"frame larger than {limit} bytes")
    try:
        return node_frame_adapter.validate_json(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "frame"
        # The reason goes back to the node; keep it short (close reasons max 123 bytes).
        raise ProtocolViolation(
            CLOSE_BAD_FRAME, f"bad frame: {where}: {first['msg']}"[:120]
        ) from None


async def _receive(ws: WebSocket) -> str | bytes | None:
    message = await ws.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    return message.get("text") if message.get("text") is not None else message.get("bytes")


@router.get(
    "/v1/nodes/catalog",
    summary="Where each model's artifact lives (URL, sha256, size); for device tokens",
    response_model=None,
)
async def node_catalog(_device: CurrentDevice, gateway: GatewayDep) -> Response:
    return json_response({"object": "list", "data": gateway.node_catalog})


async def _take_turn(ws: WebSocket, gateway: Gateway) -> bool:
    """Waits for a turn at the database for this handshake; False (and the connection
    closed with 1013, try again later) if none came within ``HANDSHAKE_WAIT_S``.

    A reconnection storm (a gateway restart, a network blip) brings thousands of devices
    at once. Their database work takes a few turns at a time, so it never drains the
    connection pool that requests, readiness checks and the job log need; and a device
    that would wait longer is sent away to back off and come again, so the waiting line —
    and the memory it holds — stays short however many devices knock."""
    try:
        async with asyncio.timeout(HANDSHAKE_WAIT_S):
            await gateway.handshakes.acquire()
    except TimeoutError:
        with contextlib.suppress(Exception):
            await ws.close(CLOSE_TRY_AGAIN_LATER, "the gateway is busy; try again shortly")
        return False
    return True


@router.websocket("/v1/nodes/connect")
async def connect(ws: WebSocket) -> None:
    gateway: Gateway = ws.app.state.gateway
    await ws.accept()
    if not await _take_turn(ws, gateway):
        return
    try:
        principal = await verify_device_token(
            gateway.engine, parse_bearer(ws.headers.get("authorization"))
        )
    finally:
        gateway.handshakes.release()
    if principal is None:
        await ws.close(CLOSE_UNAUTHORIZED, "missing or invalid device token")
        return
    limit = gateway.settings.max_frame_bytes
    try:
        raw = await asyncio.wait_for(_receive(ws), HELLO_TIMEOUT_S)
        hello = parse_frame(raw, limit)
        if not isinstance(hello, Hello):
            raise ProtocolViolation(CLOSE_OUT_OF_ORDER, "the first frame must be hello")
        if hello.protocol != PROTOCOL_VERSION:
            raise ProtocolViolation(
                CLOSE_UNSUPPORTED_VERSION,
                f"protocol {hello.protocol} is not supported; this gateway speaks {PROTOCOL_VERSION}",
            )
    except ProtocolViolation as exc:
        await ws.close(exc.close_code, close_reason(exc.reason))
        return
    except (TimeoutError, WebSocketDisconnect):
        with contextlib.suppress(Exception):
            await ws.close(CLOSE_OUT_OF_ORDER, "no hello")
        return

    accepted = [m.id for m in hello.models if gateway.catalog.accepts_artifact(m.id, m.sha256)]
    rejected = sorted({m.id for m in hello.models} - set(accepted))
    if not await _take_turn(ws, gateway):
        return
    try:
        profile = await gateway.trust.profile_for(
            principal.device_id, principal.account_id, hello.engine
        )
        await _record_hello(gateway, principal.device_id, hello)
    finally:
        gateway.handshakes.release()
    device = DeviceConnection(
        device_id=principal.device_id,
        account_id=principal.account_id,
        region=hello.region,
        slots=hello.slots,
        models=frozenset(accepted),
        send_text=ws.send_text,
        node_version=hello.node_version,
        profile=profile,
        contexts=_contexts(hello.models, accepted),
    )
    welcome = Welcome(
        device_id=principal.device_id,
        heartbeat_interval_s=gateway.settings.heartbeat_interval_s,
        rejected_models=rejected,
    )
    await ws.send_text(welcome.model_dump_json())
    device.transition(ConnectionState.READY)
    replaced = gateway.registry.add(device)
    if replaced is not None:
        replaced.close_code = CLOSE_REPLACED
        replaced.close("the device connected again")
    gateway.presence_changed(device)
    log.info(
        "device connected",
        extra={"device_id": device.device_id, "models": accepted, "slots": device.slots},
    )
    writer = asyncio.create_task(_write(ws, device), name=f"ws-writer-{device.device_id}")
    try:
        await _read(ws, device, gateway, limit)
    except ProtocolViolation as exc:
        log.warning(
            "device broke the protocol",
            extra={
                "device_id": device.device_id,
                "close_code": exc.close_code,
                "reason": exc.reason,
            },
        )
        device.close_code = exc.close_code
        device.close(exc.reason)
    except WebSocketDisconnect:
        device.close("disconnected")
    except Exception:
        log.exception("device connection failed", extra={"device_id": device.device_id})
        device.close_code = CLOSE_GOING_AWAY
        device.close("gateway error")
    finally:
        device.close("disconnected")
        gateway.registry.remove(device)
        if gateway.registry.get(device.device_id) is None:  # not replaced by a new connection
            gateway.presence_left(device)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer, 5)
        writer.cancel()
        log.info(
            "device disconnected",
            extra={"device_id": device.device_id, "reason": device.close_reason},
        )


async def _write(ws: WebSocket, device: DeviceConnection) -> None:
    """The only task that sends on this socket; a None in the outbox closes it."""
    try:
        while True:
            text = await device.outbox.get()
            if text is None:
                break
            await ws.send_text(text)
    except Exception:
        device.close("send failed")
    with contextlib.suppress(Exception):
        await ws.close(device.close_code, close_reason(device.close_reason))


async def _read(ws: WebSocket, device: DeviceConnection, gateway: Gateway, limit: int) -> None:
    while device.state is not ConnectionState.CLOSED:
        frame = parse_frame(await _receive(ws), limit)
        device.last_seen = time.monotonic()
        if isinstance(frame, Delta | Done | JobError):
            channel = device.active.get(frame.job_id)
            if channel is not None:
                channel.put_nowait(frame)
            elif frame.job_id not in device.recent:
                raise ProtocolViolation(
                    CLOSE_OUT_OF_ORDER, f"frame for a job this device was not given: {frame.job_id}"
                )
            # else: a late frame for an attempt that already ended (e.g. after a cancel).
        elif isinstance(frame, Heartbeat):
            _apply_heartbeat(device, frame, gateway)
        elif isinstance(frame, ModelsChanged):
            accepted = frozenset(
                m.id for m in frame.models if gateway.catalog.accepts_artifact(m.id, m.sha256)
            )
            gateway.registry.update_models(device, accepted, _contexts(frame.models, accepted))
            gateway.presence_changed(device)
        else:
            raise ProtocolViolation(CLOSE_OUT_OF_ORDER, "hello was already received")


def _apply_heartbeat(device: DeviceConnection, beat: Heartbeat, gateway: Gateway) -> None:
    warming = frozenset(m.id for m in beat.warming if gateway.catalog.get(m.id) is not None)
    warming_changed = warming != device.warming
    if warming_changed:
        gateway.registry.set_warming(device, warming)
    pause_changed = gateway.registry.set_paused(device, beat.paused, beat.pause_reason)
    if warming_changed or pause_changed:
        gateway.presence_changed(device)


async def _record_hello(gateway: Gateway, device_id: str, hello: Hello) -> None:
    async with gateway.engine.begin() as conn:
        await conn.execute(
            update(devices)
            .where(devices.c.id == device_id)
            .values(
                os=hello.device.os,
                cpu=hello.device.cpu,
                ram_mb=hello.device.ram_mb,
                accelerator=hello.device.accelerator,
                region=hello.region,
                node_version=hello.node_version,
                last_seen_at=utcnow(),
            )
        )


def _contexts(models: list[LoadedModel], accepted: Iterable[str]) -> dict[str, int]:
    kept = set(accepted)
    return {m.id: m.context_length for m in models if m.id in kept and m.context_length is not None}
