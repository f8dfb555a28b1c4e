"""Dependencies the routers declare: the gateway, the caller, the admin check, the body."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from swarmgate.accounts.keys import DevicePrincipal, Principal, parse_bearer, verify_device_token
from swarmgate.errors import AdminAuthError, AuthError, BodyTooLarge, RequestError
from swarmgate.gateway import Gateway


async def get_gateway(request: Request) -> Gateway:
    # async: a plain def dependency would cost a thread-pool hop on every request
    gateway: Gateway = request.app.state.gateway
    return gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


async def current_principal(request: Request) -> Principal:
    gateway: Gateway = request.app.state.gateway
    return await gateway.authenticate(request.headers.get("authorization"))


CurrentPrincipal = Annotated[Principal, Depends(current_principal)]


async def current_device(request: Request) -> DevicePrincipal:
    """The device behind a device token (``sg_dev_…``): node-facing endpoints."""
    gateway: Gateway = request.app.state.gateway
    device = await verify_device_token(
        gateway.engine, parse_bearer(request.headers.get("authorization"))
    )
    if device is None:
        raise AuthError("Missing or invalid device token.", code="INVALID_DEVICE_TOKEN")
    return device


CurrentDevice = Annotated[DevicePrincipal, Depends(current_device)]


async def require_admin(request: Request) -> None:
    gateway: Gateway = request.app.state.gateway
    expected = gateway.settings.admin_token
    presented = parse_bearer(request.headers.get("authorization")) or ""
    if not expected:
        raise AdminAuthError("The admin API is off: set SWARMGATE_ADMIN_TOKEN to turn it on.")
    if not hmac.compare_digest(presented.encode(), expected.encode()):
        raise AdminAuthError("Missing or invalid admin token.")


AdminDep = Depends(require_admin)


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refused with 413 as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError("Invalid Content-Length header.")
        if int(declared) > limit:
            raise BodyTooLarge(f"The request body is larger than the {limit}-byte limit.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"The request body is larger than the {limit}-byte limit.")
        chunks.append(chunk)
    return b"".join(chunks)
