"""Sign-up, sign-in and sign-out with an email and a password, and the caller's account."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from swarmgate.accounts import service
from swarmgate.accounts.keys import parse_bearer
from swarmgate.accounts.signin import (
    MAX_EMAIL_LENGTH,
    MAX_PASSWORD_LENGTH,
    SESSION_PREFIX,
    Role,
    sign_in,
    sign_up,
)
from swarmgate.api.deps import CurrentPrincipal, GatewayDep, read_body
from swarmgate.api.responses import json_response
from swarmgate.api.schemas import body_schema, parse_body
from swarmgate.errors import Forbidden, RequestError

router = APIRouter(tags=["accounts"])

_STRICT = ConfigDict(extra="forbid", strict=True)


def _developer_only() -> list[Role]:
    return ["developer"]


class SignUpRequest(BaseModel):
    model_config = _STRICT

    # Lengths beyond these are refused here; the finer checks (email shape, the
    # password's minimum length) give their own messages in accounts/signin.py.
    email: str = Field(max_length=MAX_EMAIL_LENGTH + 100)
    password: str = Field(max_length=MAX_PASSWORD_LENGTH)
    name: str | None = Field(default=None, min_length=1, max_length=200)
    roles: list[Role] = Field(default_factory=_developer_only, min_length=1, max_length=2)


class SignInRequest(BaseModel):
    model_config = _STRICT

    email: str = Field(max_length=MAX_EMAIL_LENGTH + 100)
    password: str = Field(max_length=MAX_PASSWORD_LENGTH)


@router.post(
    "/v1/auth/signup",
    status_code=201,
    summary="Create an account: returns a first API key (shown once) and a session",
    openapi_extra=body_schema(SignUpRequest),
    response_model=None,
)
async def signup(request: Request, gateway: GatewayDep) -> Response:
    settings = gateway.settings
    if not settings.signup_enabled:
        raise Forbidden("Sign-up is turned off on this gateway.", code="SIGNUP_DISABLED")
    body = parse_body(SignUpRequest, await read_body(request, settings.max_body_bytes))
    created = await sign_up(
        gateway.engine,
        gateway.sessions.passwords,
        email=body.email,
        password=body.password,
        name=body.name,
        roles=list(dict.fromkeys(body.roles)),
        welcome_credit_micros=settings.welcome_credit_micros,
        session_ttl_s=settings.session_ttl_s,
    )
    return json_response(
        {
            "object": "signup",
            "account": created.account,
            "api_key": {**created.key_description, "key": created.key.secret},
            "session": created.session.describe(),
        },
        status_code=201,
    )


@router.post(
    "/v1/auth/signin",
    summary="Sign in with an email and a password: returns a session token",
    openapi_extra=body_schema(SignInRequest),
    response_model=None,
)
async def signin(request: Request, gateway: GatewayDep) -> Response:
    settings = gateway.settings
    body = parse_body(SignInRequest, await read_body(request, settings.max_body_bytes))
    session = await sign_in(
        gateway.engine,
        gateway.sessions.passwords,
        email=body.email,
        password=body.password,
        session_ttl_s=settings.session_ttl_s,
    )
    return json_response(session.describe())


@router.post("/v1/auth/signout", summary="End the presented session", response_model=None)
async def signout(request: Request, gateway: GatewayDep) -> Response:
    token = parse_bearer(request.headers.get("authorization"))
    if token is None or not token.startswith(SESSION_PREFIX):
        raise RequestError(
            f"Sign-out ends a session: send 'Authorization: Bearer {SESSION_PREFIX}…'. "
            "API keys are revoked with DELETE /v1/keys/{id}.",
            param="authorization",
        )
    principal = await gateway.sessions.verify(token)
    await gateway.sessions.revoke(token)
    return json_response({"object": "session", "account_id": principal.account_id, "revoked": True})


@router.get("/v1/account", summary="The caller's account", response_model=None)
async def get_account(principal: CurrentPrincipal, gateway: GatewayDep) -> Response:
    return json_response(await service.get_account(gateway.engine, principal.account_id))
