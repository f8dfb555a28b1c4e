"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import text
from starlette.responses import Response

from swarmgate.api.deps import GatewayDep
from swarmgate.api.responses import json_response

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
    return json_response({"status": "ready", "devices": len(gateway.registry.devices())})
