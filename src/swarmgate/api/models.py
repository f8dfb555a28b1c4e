"""``GET /v1/models``: the catalog, with live availability."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.responses import Response

from swarmgate.api.deps import CurrentPrincipal, GatewayDep
from swarmgate.api.responses import json_response
from swarmgate.catalog import CatalogModel
from swarmgate.gateway import Gateway

router = APIRouter(tags=["models"])

# Catalog entries have no creation time of their own; OpenAI's shape wants one.
_CATALOG_EPOCH = 1_767_225_600  # 2026-01-01T00:00:00Z


def _usd(micros: int) -> str:
    return f"{micros // 1_000_000}.{micros % 1_000_000:06d}"


def describe_model(gateway: Gateway, model: CatalogModel) -> dict[str, Any]:
    pricing = model.pricing
    return {
        "id": model.id,
        "object": "model",
        "created": _CATALOG_EPOCH,
        "owned_by": "swarmgate",
        "type": model.type,
        "description": model.description,
        "available": gateway.registry.has_model(model.id)
        or (model.tier != "p2p" and gateway.upstreams.serves(model)),
        "devices": gateway.registry.device_count(model.id),
        "cloud": model.tier != "p2p" and gateway.upstreams.serves(model),
        "tier": model.tier,
        "context_length": model.context_length,
        "pricing": {
            "input_per_1m_micros": pricing.input_per_1m_micros,
            "output_per_1m_micros": pricing.output_per_1m_micros,
            "input_per_1m_usd": _usd(pricing.input_per_1m_micros),
            "output_per_1m_usd": _usd(pricing.output_per_1m_micros),
        },
    }


@router.get("/v1/models", summary="List the models", response_model=None)
async def list_models(_principal: CurrentPrincipal, gateway: GatewayDep) -> Response:
    data = [describe_model(gateway, model) for model in gateway.catalog]
    return json_response({"object": "list", "data": data})


@router.get("/v1/models/{model_id:path}", summary="Get one model", response_model=None)
async def get_model(model_id: str, _principal: CurrentPrincipal, gateway: GatewayDep) -> Response:
    from swarmgate.api.chat import resolve_model

    return json_response(describe_model(gateway, resolve_model(gateway, model_id)))
