"""Liveness and readiness."""

from __future__ import annotations

from collections import Counter

from fastapi import APIRouter
from sqlalchemy import text
from starlette.responses import Response

from swarmgate.api.deps import GatewayDep
from swarmgate.api.responses import json_response
from swarmgate.metrics import CONTENT_TYPE

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up", response_model=None)
async def healthz() -> Response:
    return json_response({"status": "ok"})


@router.get("/readyz", summary="The gateway can serve: database reachable", response_model=None)
async def readyz(gateway: GatewayDep) -> Response:
    if not gateway.ready:
        return json_response({"status": "starting"}, status_code=503)
    try:
        async with gateway.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
    except Exception:
        return json_response({"status": "database unreachable"}, status_code=503)
    if gateway.mesh is not None and not await gateway.mesh.ping():
        return json_response({"status": "redis unreachable"}, status_code=503)
    return json_response({"status": "ready", "devices": len(gateway.registry.devices())})


@router.get("/metrics", summary="Prometheus metrics", response_model=None)
async def metrics(gateway: GatewayDep) -> Response:
    counts: Counter[tuple[str, str]] = Counter()
    for device in gateway.registry.devices():
        state = "suspended" if device.profile.suspended_reason else device.state.value
        for model in device.models or ("",):
            counts[(state, model)] += 1
    body = gateway.metrics.render(
        ((state, model, n) for (state, model), n in sorted(counts.items())),
        gateway.billing.holds_open,
    )
    return Response(body, media_type=CONTENT_TYPE)
