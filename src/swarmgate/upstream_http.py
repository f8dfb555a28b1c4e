"""The cloud path's HTTP/1.1 client: keep-alive connections to each upstream, nothing else.

A cloud request is one POST with a JSON body, answered with JSON or a stream of server-
sent events. A general-purpose client spent most of the gateway's CPU on such a request
(building and checking a request object, pool bookkeeping, a line decoder, per-read
timeouts that schedule a task); this one writes the request in one buffer, reads the
head with one ``readuntil``, and hands the body over as it arrives — with a length, in
chunks, or until the server closes. A connection whose answer was read to its end goes
back to its origin's pool; one abandoned midway is closed.

Failures are ``UpstreamHttpError`` (``UpstreamHttpTimeout`` for a deadline passed);
``upstreams.py`` turns them into the gateway's errors. A request sent on a pooled
connection that the server had already closed (it answers nothing at all) is sent once
more on a new connection, as other clients do.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

MAX_HEAD_BYTES = 64 * 1024
MAX_LINE_BYTES = 1024 * 1024  # one server-sent event line
READ_SIZE = 64 * 1024
_CRLF = b"\r\n"


class UpstreamHttpError(Exception):
    """The upstream could not be reached, or answered something that is not HTTP/1.1."""


class UpstreamHttpTimeout(UpstreamHttpError):
    pass


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: str
    host: str  # what to connect to: a name, or the address a guard checked
    port: int
    server_hostname: str | None  # TLS: the name the certificate must carry

    @classmethod
    def of(cls, url: str, server_hostname: str | None = None) -> tuple[Origin, str, str]:
        """The origin of ``url``, its request target (path and query) and Host header."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UpstreamHttpError(f"not an http(s) URL: {url!r}")
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host_header = parts.netloc.rsplit("@", 1)[-1]
        name = (server_hostname or parts.hostname) if tls else None
        return cls(parts.scheme, parts.hostname, port, name), target, host_header


@dataclass(eq=False, slots=True)
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    reused: bool = False

    def close(self) -> None:
        self.writer.close()


class Response:
    """An answer's status and headers; the body is read with ``read`` or ``lines``."""

    def __init__(
        self,
        status: int,
        headers: dict[str, str],
        reader: asyncio.StreamReader,
        timeout_s: float,
    ) -> None:
        self.status = status
        self.headers = headers
        self._reader = reader
        self._timeout_s = timeout_s
        encoding = headers.get("transfer-encoding", "").lower()
        self._chunked = "chunked" in encoding
        length = headers.get("content-length")
        self._left: int | None = None
        if not self._chunked and length is not None:
            if not length.strip().isdigit():
                raise UpstreamHttpError(f"bad Content-Length {length!r}")
            self._left = int(length)
        self._until_close = not self._chunked and self._left is None
        self.complete = self._left == 0
        self.keep_alive = headers.get("connection", "").lower() != "close"

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; ``complete`` once its end was read."""
        reader, timeout_s = self._reader, self._timeout_s
        try:
            if self._chunked:
                while True:
                    async with asyncio.timeout(timeout_s):
                        size_line = await reader.readuntil(_CRLF)
                    size_text = size_line.split(b";", 1)[0].strip()
                    try:
                        size = int(size_text, 16)
                    except ValueError:
                        raise UpstreamHttpError(f"bad chunk size {size_text!r}") from None
                    if size == 0:
                        async with asyncio.timeout(timeout_s):
                            while await reader.readuntil(_CRLF) != _CRLF:
                                pass  # trailers
                        self.complete = True
                        return
                    async with asyncio.timeout(timeout_s):
                        data = await reader.readexactly(size + 2)
                    yield data[:-2]
            elif self._left is not None:
                while self._left > 0:
                    async with asyncio.timeout(timeout_s):
                        data = await reader.read(min(self._left, READ_SIZE))
                    if not data:
                        raise UpstreamHttpError("the upstream closed the connection mid-answer")
                    self._left -= len(data)
                    yield data
                self.complete = True
            else:
                while True:
                    async with asyncio.timeout(timeout_s):
                        data = await reader.read(READ_SIZE)
                    if not data:
                        self.complete = True
                        self.keep_alive = False
                        return
                    yield data
        except TimeoutError:
            raise UpstreamHttpTimeout("the upstream stopped sending") from None
        except asyncio.IncompleteReadError:
            raise UpstreamHttpError("the upstream closed the connection mid-answer") from None
        except asyncio.LimitOverrunError:
            raise UpstreamHttpError("the upstream sent an overlong chunk header") from None
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamHttpError(f"reading the answer failed: {exc}") from exc

    async def read(self, limit: int = 64 * 1024 * 1024) -> bytes:
        parts: list[bytes] = []
        size = 0
        async for chunk in self.chunks():
            size += len(chunk)
            if size > limit:
                raise UpstreamHttpError(f"the answer is larger than {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    async def lines(self) -> AsyncIterator[str]:
        """The body's lines, decoded, without their line ends (for server-sent events)."""
        pending = b""
        async for chunk in self.chunks():
            pending += chunk
            if b"\n" not in chunk:
                if len(pending) > MAX_LINE_BYTES:
                    raise UpstreamHttpError("the upstream sent an overlong line")
                continue
            *whole, pending = pending.split(b"\n")
            for line in whole:
                yield line.rstrip(b"\r").decode("utf-8", "replace")
        if pending:
            yield pending.rstrip(b"\r").decode("utf-8", "replace")


@dataclass
class HttpClient:
    """Keep-alive HTTP/1.1 connections, pooled per origin, for one upstream's calls."""

    timeout_s: float
    connect_timeout_s: float
    max_idle_per_origin: int = 64
    _idle: dict[Origin, list[_Connection]] = field(default_factory=dict)
    _tls: ssl.SSLContext | None = None

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls

    async def _connect(self, origin: Origin) -> _Connection:
        tls = self._tls_context() if origin.scheme == "https" else None
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                reader, writer = await asyncio.open_connection(
                    origin.host,
                    origin.port,
                    ssl=tls,
                    server_hostname=origin.server_hostname if tls else None,
                    limit=MAX_HEAD_BYTES,
                )
        except TimeoutError:
            raise UpstreamHttpTimeout(f"connecting to {origin.host} timed out") from None
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamHttpError(f"connecting to {origin.host} failed: {exc}") from exc
        return _Connection(reader, writer)

    def _take_idle(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            if not connection.reader.at_eof() and not connection.writer.is_closing():
                connection.reused = True
                return connection
            connection.close()
        return None

    def _release(self, origin: Origin, connection: _Connection) -> None:
        idle = self._idle.setdefault(origin, [])
        if len(idle) >= self.max_idle_per_origin:
            connection.close()
        else:
            idle.append(connection)

    @contextlib.asynccontextmanager
    async def post(
        self,
        url: str,
        body: bytes,
        headers: dict[str, str],
        *,
        server_hostname: str | None = None,
    ) -> AsyncIterator[Response]:
        """POSTs ``body``; the answer is the context's value. The connection goes back to
        the pool if the answer was read to its end, and is closed otherwise."""
        origin, target, host = Origin.of(url, server_hostname)
        head = [f"POST {target} HTTP/1.1", f"Host: {headers.get('Host', host)}"]
        head += [f"{k}: {v}" for k, v in headers.items() if k.lower() != "host"]
        head += [f"Content-Length: {len(body)}", "", ""]
        request = "\r\n".join(head).encode("latin-1") + body
        connection = self._take_idle(origin) or await self._connect(origin)
        try:
            try:
                response = await self._exchange(connection, request)
            except _StaleConnection:
                connection.close()
                connection = await self._connect(origin)
                response = await self._exchange(connection, request)
        except BaseException:
            connection.close()
            raise
        try:
            yield response
        except BaseException:
            connection.close()
            raise
        if response.complete and response.keep_alive:
            self._release(origin, connection)
        else:
            connection.close()

    async def _exchange(self, connection: _Connection, request: bytes) -> Response:
        reader, writer = connection.reader, connection.writer
        try:
            writer.write(request)
            async with asyncio.timeout(self.timeout_s):
                await writer.drain()
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError as exc:
                    if connection.reused and not exc.partial:
                        raise _StaleConnection from None
                    raise UpstreamHttpError("the upstream closed the connection") from None
        except TimeoutError:
            raise UpstreamHttpTimeout("the upstream did not answer in time") from None
        except asyncio.LimitOverrunError:
            raise UpstreamHttpError("the upstream's answer head is too long") from None
        except ConnectionResetError as exc:
            if connection.reused:
                raise _StaleConnection from exc
            raise UpstreamHttpError(f"the upstream reset the connection: {exc}") from exc
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamHttpError(f"talking to the upstream failed: {exc}") from exc
        return _parse_head(head, reader, self.timeout_s)

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()


class _StaleConnection(Exception):
    """A pooled connection the server had closed: nothing was answered on it."""


def _parse_head(head: bytes, reader: asyncio.StreamReader, timeout_s: float) -> Response:
    lines = head.decode("latin-1").split("\r\n")
    status_line = lines[0].split(" ", 2)
    if (
        len(status_line) < 2
        or not status_line[0].startswith("HTTP/1.")
        or not (status_line[1].isdigit())
    ):
        raise UpstreamHttpError(f"not an HTTP/1.1 answer: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise UpstreamHttpError(f"bad header line {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    response = Response(int(status_line[1]), headers, reader, timeout_s)
    if status_line[0] == "HTTP/1.0" and headers.get("connection", "").lower() != "keep-alive":
        response.keep_alive = False
    return response
