"""The endpoints every inference request hits, served straight from ASGI.

Routing, dependency solving and the framework's middleware cost about as much CPU per
request as all of Swarmgate's own work (see BENCHMARKS.md). The completion endpoints are
therefore matched here, in one dict lookup, and call the same handler functions the
routers declare; everything else, and the OpenAPI description of these endpoints too,
stays with the full application.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from swarmgate.accounts.keys import Principal
from swarmgate.api.errors import envelope, error_response
from swarmgate.errors import SwarmgateError
from swarmgate.gateway import Gateway

log = logging.getLogger("swarmgate.api")

Handler = Callable[[Request, Gateway, Principal], Awaitable[Response]]


class HotPaths:
    def __init__(self, app: ASGIApp, gateway: Gateway, routes: dict[str, Handler]) -> None:
        self.app = app
        self.gateway = gateway
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            handler = self.routes.get(scope["path"])
            if handler is not None:
                await self._serve(handler, scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _serve(self, handler: Handler, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        request = Request(scope, receive)
        try:
            principal = await self.gateway.authenticate(request.headers.get("authorization"))
            response = await handler(request, self.gateway, principal)
        except SwarmgateError as exc:
            response = error_response(exc)
        except Exception:
            # Never echo internals (or request content) back; the traceback goes to the log.
            log.exception("unhandled error on %s", scope["path"])
            response = envelope(
                500, "Internal error. It has been logged.", "INTERNAL_ERROR", "api_error"
            )
        self.gateway.metrics.request(
            scope["path"], response.status_code, time.perf_counter() - started
        )
        await response(scope, receive, send)
