"""The ASGI application: ``create_app(settings)`` builds a gateway and mounts the routers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp

from swarmgate import __version__
from swarmgate.api import (
    admin,
    auth,
    billing,
    chat,
    conversations,
    health,
    inference,
    keys,
    models,
    nodes,
    provider,
    running,
    trust,
    usage,
    vault,
    webhooks,
    workflows,
)
from swarmgate.api.errors import install_error_handlers
from swarmgate.api.hotpath import HotPaths
from swarmgate.api.idempotency import Idempotency
from swarmgate.api.openapi import install_openapi
from swarmgate.api.request_ids import RequestIds
from swarmgate.api.responses import JSONResponse
from swarmgate.config import GatewaySettings
from swarmgate.dashboard import pages as dashboard
from swarmgate.dashboard.web import compiled_pages
from swarmgate.gateway import Gateway
from swarmgate.tracing import Tracing, tracing_from_settings


def create_app(settings: GatewaySettings | None = None, gateway: Gateway | None = None) -> FastAPI:
    settings = settings or GatewaySettings()
    gateway = gateway or Gateway(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            try:
                await gateway.stop()
            finally:
                if gateway.tracing is not None:
                    await gateway.tracing.shutdown()  # the last spans, jobs' included, go out

    app = FastAPI(
        title="Swarmgate",
        version=__version__,
        description=(
            "An OpenAI-compatible API whose models run on devices people own. "
            "Authenticate with `Authorization: Bearer sg_live_…`."
        ),
        lifespan=lifespan,
        default_response_class=JSONResponse,
        # Tracing is configured by Swarmgate itself; skip the per-request provider checks.
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    app.state.gateway = gateway
    gateway.memory.runner = running.upkeep_runner(gateway)
    install_error_handlers(app)
    install_openapi(app)
    for module in (
        chat,
        inference,
        models,
        health,
        admin,
        nodes,
        provider,
        auth,
        keys,
        billing,
        webhooks,
        usage,
        trust,
        vault,
        conversations,
        workflows,
    ):
        app.include_router(module.router)
    app.state.dashboard_templates, app.state.dashboard_static = compiled_pages()
    app.include_router(dashboard.router)
    return app


def create_asgi_app(
    settings: GatewaySettings | None = None,
    gateway: Gateway | None = None,
    tracing: Tracing | None = None,
) -> RequestIds:
    """What the server runs: the full app behind the hot path for completions, both
    behind Idempotency-Key handling (a pass-through for requests without the header).

    ``tracing``: where spans go; None: as the settings say (``SWARMGATE_OTEL_ENDPOINT``;
    raises ``TracingUnavailable`` when that is set and the ``otel`` extra is missing).
    With tracing off the app is built exactly as without it."""
    settings = settings or GatewaySettings()
    if tracing is None:
        tracing = tracing_from_settings(settings)
    gateway = gateway or Gateway(settings)
    gateway.tracing = tracing
    hot = HotPaths(
        create_app(settings, gateway),
        gateway=gateway,
        routes={
            "/v1/chat/completions": chat.chat_completions,
            "/v1/inference": inference.inference,
        },
    )
    app: ASGIApp = Idempotency(hot, gateway, gateway.idempotency)
    if gateway.tracing is not None:
        # Inside RequestIds, so that the request's id is known to its span.
        app = gateway.tracing.server_spans(app, hot.routes)
    return RequestIds(app)
