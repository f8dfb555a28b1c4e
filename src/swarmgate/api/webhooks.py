"""``/v1/webhooks``: the URLs an account wants events sent to, and their delivery logs.

How deliveries are signed and how a receiver checks them: ``webhooks/signing.py``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from swarmgate.api.billing import UsdAmount, parse_exact_body, usd_to_micros
from swarmgate.api.deps import CurrentPrincipal, GatewayDep, read_body
from swarmgate.api.responses import json_response

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])


class NewWebhookEndpoint(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    url: str = Field(min_length=1, max_length=2000)
    # Checked against the known event types by the service, with one clear message.
    events: list[str] = Field(min_length=1, max_length=10)
    usage_threshold_usd: UsdAmount | None = None


@router.post("", status_code=201, summary="Register a webhook endpoint", response_model=None)
async def create_endpoint(
    request: Request, principal: CurrentPrincipal, gateway: GatewayDep
) -> Response:
    body = parse_exact_body(
        NewWebhookEndpoint, await read_body(request, gateway.settings.max_body_bytes)
    )
    threshold = None
    if body.usage_threshold_usd is not None:
        threshold = usd_to_micros(body.usage_threshold_usd, param="usage_threshold_usd")
    created = await gateway.webhooks.create_endpoint(
        principal.account_id,
        url=body.url,
        events=body.events,
        usage_threshold_micros=threshold,
    )
    return json_response(created, status_code=201)


@router.get("", summary="List webhook endpoints (without their secrets)", response_model=None)
async def list_endpoints(principal: CurrentPrincipal, gateway: GatewayDep) -> Response:
    data = await gateway.webhooks.list_endpoints(principal.account_id)
    return json_response({"object": "list", "data": data})


@router.delete("/{endpoint_id}", summary="Delete a webhook endpoint", response_model=None)
async def delete_endpoint(
    endpoint_id: str, principal: CurrentPrincipal, gateway: GatewayDep
) -> Response:
    await gateway.webhooks.delete_endpoint(principal.account_id, endpoint_id)
    return json_response({"id": endpoint_id, "object": "webhook_endpoint", "deleted": True})


@router.get(
    "/{endpoint_id}/deliveries",
    summary="An endpoint's delivery log, newest first",
    response_model=None,
)
async def list_deliveries(
    endpoint_id: str,
    principal: CurrentPrincipal,
    gateway: GatewayDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 50,
) -> Response:
    data = await gateway.webhooks.deliveries(principal.account_id, endpoint_id, limit=limit)
    return json_response({"object": "list", "data": data})
