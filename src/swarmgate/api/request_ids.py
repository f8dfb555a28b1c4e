"""A request id for every HTTP request: the caller's ``X-Request-ID`` when it is a sane
token, else a new one; returned as ``x-request-id`` and attached to every log line
written while the request is handled (``logs.request_id``)."""

from __future__ import annotations

import itertools
import re
import secrets

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from swarmgate.logs import request_id

HEADER = b"x-request-id"
_SANE = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")
# New ids: a random prefix per process and a counter (unique without a syscall each).
_PREFIX = secrets.token_hex(6)
_COUNTER = itertools.count(1)


class RequestIds:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = None
        for name, value in scope["headers"]:
            if name == HEADER:
                given = value
                break
        if given is None or not _SANE.match(given):
            given = f"{_PREFIX}{next(_COUNTER) & 0xFFFFFFFFFFFF:012x}".encode()
        rid = given
        token = request_id.set(rid.decode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), (HEADER, rid)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id.reset(token)
