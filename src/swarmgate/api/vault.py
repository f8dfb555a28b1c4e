"""``/v1/vault``: an account's own upstream API keys (BYOK), stored sealed.

The key goes in once and never comes out: reads show whether one exists, its provider,
its last four characters and when it was stored. With a key for an upstream, the
account's cloud requests there use it, and are charged only the platform's fee.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.responses import Response

from swarmgate.api.deps import CurrentPrincipal, GatewayDep, read_body
from swarmgate.api.responses import json_response
from swarmgate.api.schemas import body_schema, parse_body
from swarmgate.errors import RequestError, UpstreamAddressRefused
from swarmgate.gateway import Gateway

router = APIRouter(prefix="/v1/vault", tags=["vault"])

_MAX_BODY = 16_384


class VaultKey(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    provider: str | None = Field(default=None, min_length=1, max_length=64)
    api_key: str = Field(alias="apiKey", min_length=8, max_length=1000, repr=False)
    base_url: str | None = Field(default=None, alias="baseUrl", max_length=500)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("https://", "http://")):
            raise ValueError("must be an http(s) URL")
        return value

    @field_validator("api_key")
    @classmethod
    def _no_spaces(cls, value: str) -> str:
        if value != value.strip() or any(c.isspace() for c in value):
            raise ValueError("must not contain spaces or line breaks")
        return value


def _provider(gateway: Gateway, asked: str | None) -> str:
    known = gateway.upstreams.names()
    if asked is None:
        if not known:
            raise RequestError(
                "This gateway has no cloud upstreams configured, so no key can be used.",
                param="provider",
            )
        return known[0]
    if asked not in known:
        names = ", ".join(known) or "none"
        raise RequestError(
            f"Unknown provider '{asked}'. This gateway's upstreams: {names}.", param="provider"
        )
    return asked


async def _public_url(gateway: Gateway, url: str) -> None:
    """A developer's base URL must not point the gateway at its own network (loopback,
    private, link-local addresses), unless the operator allows it. The same check runs
    again on every call that uses it (``upstreams.AddressGuard``)."""
    try:
        await gateway.upstreams.guard.pin(url)
    except UpstreamAddressRefused as exc:
        raise RequestError(
            exc.message.replace("The base URL", "baseUrl"), param="baseUrl"
        ) from None


@router.post(
    "",
    status_code=201,
    summary="Store (or replace) an upstream API key",
    response_model=None,
    openapi_extra=body_schema(VaultKey),
)
async def put_key(request: Request, principal: CurrentPrincipal, gateway: GatewayDep) -> Response:
    body = parse_body(VaultKey, await read_body(request, _MAX_BODY))
    provider = _provider(gateway, body.provider)
    if body.base_url is not None:
        await _public_url(gateway, body.base_url)
    entry = await gateway.vault.put(principal.account_id, provider, body.api_key, body.base_url)
    return json_response(entry.describe(), status_code=201)


@router.get("", summary="Whether the vault holds a key (never the key itself)", response_model=None)
async def get_keys(
    principal: CurrentPrincipal,
    gateway: GatewayDep,
    provider: Annotated[str | None, Query(max_length=64)] = None,
) -> Response:
    entries = await gateway.vault.entries(principal.account_id)
    if provider is not None:
        entries = [e for e in entries if e.provider == provider]
        if not entries:
            return json_response({"exists": False, "provider": provider})
        return json_response(entries[0].describe())
    return json_response(
        {"exists": bool(entries), "object": "list", "data": [e.describe() for e in entries]}
    )


@router.delete(
    "", summary="Delete a stored key (all of them without ?provider=)", response_model=None
)
async def delete_keys(
    principal: CurrentPrincipal,
    gateway: GatewayDep,
    provider: Annotated[str | None, Query(max_length=64)] = None,
) -> Response:
    removed = await gateway.vault.remove(principal.account_id, provider)
    return json_response({"deleted": removed, "provider": provider})
