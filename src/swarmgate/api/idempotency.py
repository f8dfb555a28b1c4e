"""``Idempotency-Key`` on POST requests: a retried request runs (and is charged) once.

The first request with a key runs and its response is stored; a later request with the
same key and the same method, path and body gets the stored response again (with
``Idempotent-Replayed: true``) and runs nothing. The same key with a different request
is 422 IDEMPOTENCY_KEY_REUSED; a duplicate that arrives while the first is still running
is 409 IDEMPOTENCY_IN_PROGRESS. Keys are scoped to the account and kept for 24 hours
(``SWARMGATE_IDEMPOTENCY_TTL_S``).

Answers that say "try again later" — 401, 402, 409, 429 and every 5xx — are not
stored: the condition may have passed by the retry, and the retry then runs. A request
whose first run died with its gateway (still "in progress" after the request timeout)
may be taken over by a retry.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from swarmgate.api.errors import error_response
from swarmgate.errors import AuthError, RequestError, SwarmgateError
from swarmgate.gateway import Gateway
from swarmgate.store.idempotency import Idempotency as IdempotencyRecords
from swarmgate.store.idempotency import StoredResponse, request_fingerprint

log = logging.getLogger("swarmgate.api")

HEADER = b"idempotency-key"
MAX_KEY_LENGTH = 255
# Statuses a retry should run again for, rather than replay.
_NOT_STORED = frozenset({401, 402, 409, 429})
# Response headers worth replaying; the rest describe the original connection.
_KEPT_HEADERS = frozenset({b"content-type", b"retry-after", b"cache-control"})


class Idempotency:
    """ASGI middleware: requests without the header pass straight through."""

    def __init__(self, app: ASGIApp, gateway: Gateway, store: IdempotencyRecords) -> None:
        self.app = app
        self.gateway = gateway
        self.store = store

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        key_header = authorization = None
        for name, value in scope["headers"]:
            if name == HEADER:
                key_header = value
            elif name == b"authorization":
                authorization = value
        if key_header is None:
            await self.app(scope, receive, send)
            return
        await self._serve(scope, receive, send, key_header, authorization)

    async def _serve(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        key_header: bytes,
        authorization: bytes | None,
    ) -> None:
        try:
            key = key_header.decode("ascii").strip()
            if not key or len(key) > MAX_KEY_LENGTH:
                raise ValueError
        except ValueError:
            error = RequestError(
                f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} ASCII characters.",
                param="Idempotency-Key",
            )
            await error_response(error)(scope, receive, send)
            return
        body, complete = await _read_body(receive, self.gateway.settings.max_body_bytes)
        replay = _replaying(body, complete, receive)
        if not complete:  # too large: the endpoint answers 413 itself
            await self.app(scope, replay, send)
            return
        try:
            principal = await self.gateway.authenticate(
                authorization.decode("latin-1") if authorization else None
            )
        except AuthError:
            await self.app(scope, replay, send)  # the endpoint answers 401 itself
            return
        fingerprint = request_fingerprint(scope["method"], scope["path"], body)
        try:
            stored = await self.store.begin(principal.account_id, key, fingerprint)
        except SwarmgateError as exc:
            await error_response(exc)(scope, receive, send)
            return
        if stored is not None:
            await _send_stored(stored, send)
            return
        account_id = principal.account_id

        async def record(response: StoredResponse | None) -> None:
            try:
                await self.store.finish(account_id, key, response)
            except Exception:
                log.exception("recording an idempotent response failed")

        captured = _Capture(send, record)
        try:
            await self.app(scope, replay, captured)
        finally:
            if not captured.recorded:  # failed or cut short: free the key for a retry
                await record(None)


class _Capture:
    """Passes a response through while keeping a copy of it.

    The last piece of the body is held back until the response is recorded, so a client
    that retries the moment it has its answer gets the replay, not a 409.
    """

    def __init__(
        self, send: Send, record: Callable[[StoredResponse | None], Awaitable[None]]
    ) -> None:
        self._send = send
        self._record = record
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.recorded = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = int(message["status"])
            self.headers = [
                (bytes(n).lower(), bytes(v))
                for n, v in message.get("headers", [])
                if bytes(n).lower() in _KEPT_HEADERS
            ]
        elif message["type"] == "http.response.body":
            self.chunks.append(bytes(message.get("body", b"")))
            if not message.get("more_body", False):
                self.recorded = True
                await self._record(self.response())
        await self._send(message)

    def response(self) -> StoredResponse | None:
        if self.status in _NOT_STORED or self.status >= 500 or not self.status:
            return None
        return StoredResponse(self.status, self.headers, b"".join(self.chunks))


async def _read_body(receive: Receive, limit: int) -> tuple[bytes, bool]:
    """The body, or what was read of it (False) once it passed ``limit``."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), False
        chunk = message.get("body", b"")
        size += len(chunk)
        chunks.append(chunk)
        if size > limit:
            return b"".join(chunks), False
        if not message.get("more_body", False):
            return b"".join(chunks), True


def _replaying(body: bytes, complete: bool, receive: Receive) -> Receive:
    """A receive channel that hands the app the body already read, then the rest."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": not complete}
        return await receive()

    return replay


async def _send_stored(stored: StoredResponse, send: Send) -> None:
    headers = [
        *stored.headers,
        (b"content-length", str(len(stored.body)).encode()),
        (b"idempotent-replayed", b"true"),
    ]
    await send({"type": "http.response.start", "status": stored.status, "headers": headers})
    await send({"type": "http.response.body", "body": stored.body})
