"""The cloud path's HTTP/1.1 client: keep-alive connections to each upstream, nothing else.

A cloud request is one POST with a JSON body, answered with JSON or a stream of server-
sent events. A general-purpose client spent most of the gateway's CPU on such a request
(building and checking a request object, pool bookkeeping, a line decoder, per-read
timeouts that schedule a task). Here each connection is a plain ``asyncio.Protocol``
that keeps what it receives in one buffer: the request is written in one buffer, the
answer's head is cut from the buffer, and the body is handed over in the pieces that
arrived together — with a length, in chunks (``ChunkedDecoder``), or until the server
closes. A streamed answer whose events arrive in one read is one piece, not one await
per chunk. A connection whose answer was read to its end goes back to its origin's pool;
one abandoned midway is closed.

The deadline is one timer per connection rather than one per read: a wait for bytes
fails once the upstream has sent nothing for ``timeout_s``; the timer is re-armed only
when it fires while a later wait is still within its time. (A timer armed and cancelled
for every read was the largest single cost of a streamed answer.)

Failures are ``UpstreamHttpError`` (``UpstreamHttpTimeout`` for a deadline passed);
``upstreams.py`` turns them into the gateway's errors. A request sent on a pooled
connection that the server had already closed (it answers nothing at all) is sent once
more on a new connection, as other clients do.

Proxies are taken from the environment when a client is made, and never again, as
urllib's ``getproxies_environment`` reads them (a lowercase name wins over its uppercase
one): ``https_proxy``, ``http_proxy``, ``all_proxy`` for a scheme that has neither, and
``no_proxy``, matched as urllib matches it (``bypasses_proxy``). Which proxy, if any, a
URL goes through is decided when the URL is first parsed, so a request costs the same dict
lookup with or without one. An https URL goes through a tunnel (``CONNECT host:port``,
then TLS with the upstream over it); an http URL is sent to the proxy in absolute form.
Connections are pooled per origin and proxy, a tunnelled one like any other. Only
``http://`` proxies are spoken to.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import re
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import cast
from urllib.parse import unquote, urlsplit
from urllib.request import getproxies_environment

MAX_HEAD_BYTES = 64 * 1024
MAX_LINE_BYTES = 1024 * 1024  # one server-sent event line
# Received bytes beyond this stay in the kernel (reading pauses) until the answer's
# reader has taken what is buffered.
MAX_BUFFERED_BYTES = 1024 * 1024
_MAX_CHUNK_LINE = 4096  # a chunk-size line with its extensions, or one trailer line
_MAX_TARGETS = 1024  # parsed URLs kept per client
_HOST_PORT = re.compile(r"(.*):[0-9]*", re.DOTALL)  # as urllib splits a port off


class UpstreamHttpError(Exception):
    """The upstream could not be reached, or answered something that is not HTTP/1.1."""


class UpstreamHttpTimeout(UpstreamHttpError):
    pass


@dataclass(frozen=True, slots=True)
class Proxy:
    """An HTTP proxy, and the ``Proxy-Authorization`` line for the credentials in its URL
    (kept out of ``repr`` and of every message: ``address`` names the proxy)."""

    host: str
    port: int
    authorization: str = field(default="", repr=False)  # a header line, or ""

    @classmethod
    def from_url(cls, url: str, variable: str) -> Proxy:
        """The proxy at ``url`` (``http://[user:password@]host[:port]``; without a scheme,
        http), which ``variable`` names; ``UpstreamHttpError`` for one this client cannot
        use. No message repeats the URL: it may hold a password."""
        parts = urlsplit(url if "://" in url else f"http://{url}")
        scheme = parts.scheme.lower()
        if scheme != "http":
            raise UpstreamHttpError(
                f"{variable} names a proxy at {scheme}://; only http:// proxies are supported "
                "(an https:// proxy URL asks for TLS to the proxy itself)"
            )
        try:
            port = parts.port or 80
        except ValueError:
            raise UpstreamHttpError(f"{variable} has a bad port") from None
        if not parts.hostname:
            raise UpstreamHttpError(f"{variable} names no host")
        authorization = ""
        if parts.username:
            user_pass = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            token = base64.b64encode(user_pass.encode()).decode("ascii")
            authorization = f"Proxy-Authorization: Basic {token}\r\n"
        return cls(parts.hostname, port, authorization)

    @property
    def address(self) -> str:
        return f"{_bracketed(self.host)}:{self.port}"

    def tunnel_request(self, origin: Origin) -> bytes:
        authority = f"{_bracketed(origin.host)}:{origin.port}"
        return (
            f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{self.authorization}\r\n"
        ).encode("latin-1")


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def bypasses_proxy(host: str, no_proxy: str) -> bool:
    """Whether ``host`` (a URL's host, with ``:port`` when the URL names one) is listed in
    ``no_proxy``, as urllib's ``proxy_bypass_environment`` decides: ``*`` alone lists every
    host; otherwise each comma-separated entry, a leading dot or not, lists that name and
    the names under it, and one with ``:port`` only that port. Nothing is listed
    implicitly — not localhost nor 127.0.0.1 — and entries are names, not address ranges."""
    if no_proxy == "*":
        return True
    host = host.lower()
    with_port = _HOST_PORT.fullmatch(host)
    host_only = with_port[1] if with_port else host
    for entry in no_proxy.split(","):
        entry = entry.strip()
        if not entry:
            continue
        entry = entry.lstrip(".").lower()
        if entry in (host_only, host):
            return True
        entry = "." + entry
        if host_only.endswith(entry) or host.endswith(entry):
            return True
    return False


@dataclass(frozen=True, slots=True)
class ProxyRoutes:
    """Which proxy a URL goes through, from a mapping shaped like urllib's
    ``getproxies()`` (``{"https": url, "http": url, "all": url, "no": hosts}``)."""

    http: Proxy | None = None
    https: Proxy | None = None
    no_proxy: str | None = None

    @classmethod
    def from_mapping(cls, proxies: Mapping[str, str]) -> ProxyRoutes:
        def pick(scheme: str) -> Proxy | None:
            for key in (scheme, "all"):
                if proxies.get(key):
                    return Proxy.from_url(proxies[key], f"{key.upper()}_PROXY")
            return None

        return cls(http=pick("http"), https=pick("https"), no_proxy=proxies.get("no") or None)

    def proxy_for(self, scheme: str, host: str) -> Proxy | None:
        """The proxy for a URL of ``scheme`` on ``host`` (``host[:port]``), or None:
        direct."""
        proxy = self.https if scheme == "https" else self.http
        if proxy is None or (self.no_proxy is not None and bypasses_proxy(host, self.no_proxy)):
            return None
        return proxy


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: str
    # What to connect to — a name, or the address a guard checked — or, through a proxy,
    # what the proxy is asked to connect to.
    host: str
    port: int
    server_hostname: str | None  # TLS: the name the certificate must carry
    proxy: Proxy | None = None  # the connection is to this proxy

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


class ChunkedDecoder:
    """A chunked body (RFC 9112, section 7.1) decoded from whatever part of it has
    arrived: ``feed`` takes what it can from the front of the buffer and returns the body
    bytes in it; ``done`` once the last chunk and the trailers were read."""

    def __init__(self) -> None:
        self.done = False
        self._left = 0  # bytes of the current chunk still to come, its closing CRLF included
        self._trailers = False

    def feed(self, buffer: bytearray) -> bytes:
        body: list[bytearray] = []
        at, end = 0, len(buffer)
        while at < end and not self.done:
            if self._left:  # the rest of a chunk that arrived in parts
                take = min(self._left, end - at)
                data = min(take, self._left - 2)  # the closing CRLF is not body
                if data > 0:
                    body.append(buffer[at : at + data])
                at += take
                self._left -= take
                continue
            line_end = buffer.find(b"\r\n", at, at + _MAX_CHUNK_LINE)
            if line_end < 0:
                if end - at >= _MAX_CHUNK_LINE:
                    raise UpstreamHttpError("the upstream sent an overlong chunk header")
                break
            line = buffer[at:line_end]
            at = line_end + 2
            if self._trailers:
                self.done = not line  # an empty line ends the trailers
                continue
            size = _chunk_size(line)
            if not size:
                self._trailers = True
            elif at + size + 2 <= end:  # the whole chunk is here
                body.append(buffer[at : at + size])
                at += size + 2
            else:
                self._left = size + 2
        del buffer[:at]
        return b"".join(body)


def _chunk_size(line: bytearray) -> int:
    """The size on a chunk's first line (hexadecimal, maybe followed by extensions)."""
    try:
        size = int(line, 16)
    except ValueError:
        try:
            size = int(line.split(b";", 1)[0], 16)
        except ValueError:
            size = -1
    if size < 0:
        raise UpstreamHttpError(f"bad chunk size {bytes(line[:40])!r}")
    return size


class _Connection(asyncio.Protocol):
    """One connection to an upstream: the bytes received and not yet taken are in
    ``buffer``; ``receive`` waits for more."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
        self.loop = loop
        self.timeout_s = timeout_s
        self.buffer = bytearray()
        self.closed = False  # the server closed its side, or the connection broke
        self.error: Exception | None = None  # what broke it, if something did
        self.reused = False
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._waiting_since = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._writable: asyncio.Future[None] | None = None  # set while writing is paused
        self._reading_paused = False

    # -- asyncio's side ----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > MAX_BUFFERED_BYTES and not self._reading_paused:
            self._reading_paused = True
            assert self._transport is not None
            self._transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.closed = True
        self._wake()
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.error = exc
        self._stop_timer()
        self._wake()
        self.resume_writing()

    def pause_writing(self) -> None:
        self._writable = self.loop.create_future()

    def resume_writing(self) -> None:
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- the client's side -------------------------------------------------------------
    @property
    def reusable(self) -> bool:
        """Open, and with nothing received that no answer accounts for."""
        transport = self._transport
        return (
            not self.closed
            and not self.buffer
            and transport is not None
            and not transport.is_closing()
        )

    async def send(self, request: bytes) -> None:
        transport = self._transport
        assert transport is not None
        if self.closed or transport.is_closing():
            return  # the server is gone: reading the answer says so
        transport.write(request)
        if self._writable is not None:  # a large body the upstream is slow to take
            try:
                async with asyncio.timeout(self.timeout_s):
                    await self._writable
            except TimeoutError:
                raise UpstreamHttpTimeout("the upstream did not take the request") from None

    async def receive(self) -> None:
        """Waits until more bytes arrive or the connection ends; ``UpstreamHttpTimeout``
        once the upstream has sent nothing for ``timeout_s``."""
        if self.closed:
            return
        if self._reading_paused:  # the reader took what was buffered
            self._reading_paused = False
            assert self._transport is not None
            self._transport.resume_reading()
        self._waiting_since = self.loop.time()
        if self._timer is None:
            self._timer = self.loop.call_at(self._waiting_since + self.timeout_s, self._expire)
        waiter = self._waiter = self.loop.create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _expire(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # nothing waits now: the next wait arms the timer again
        due = self._waiting_since + self.timeout_s
        if self.loop.time() < due:
            self._timer = self.loop.call_at(due, self._expire)
            return
        waiter.set_exception(
            UpstreamHttpTimeout(f"the upstream sent nothing for {self.timeout_s:g} s")
        )

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def start_tls(self, tls: ssl.SSLContext, server_hostname: str | None) -> None:
        """TLS from here on, over what is now a proxy's tunnel."""
        assert self._transport is not None
        transport = await self.loop.start_tls(
            self._transport, self, tls, server_hostname=server_hostname
        )
        if transport is None:  # the connection closed during the handshake
            raise UpstreamHttpError("the connection closed during the TLS handshake")
        self._transport = transport

    def close(self) -> None:
        self._stop_timer()
        if self._transport is not None:
            self._transport.close()


class Response:
    """An answer's status and headers; the body is read with ``read``, ``chunks``,
    ``lines`` or ``line_batches``."""

    def __init__(self, status: int, headers: dict[str, str], connection: _Connection) -> None:
        self.status = status
        self.headers = headers
        self._connection = connection
        encoding = headers.get("transfer-encoding", "").lower()
        self._chunked = ChunkedDecoder() if "chunked" in encoding else None
        length = headers.get("content-length")
        self._left: int | None = None
        if self._chunked is None and length is not None:
            if not length.strip().isdigit():
                raise UpstreamHttpError(f"bad Content-Length {length!r}")
            self._left = int(length)
        self._until_close = self._chunked is None and self._left is None
        self.complete = self._left == 0
        self.keep_alive = headers.get("connection", "").lower() != "close"

    def _take(self) -> bytes:
        """The body bytes received and not yet taken; sets ``complete`` at the end."""
        buffer = self._connection.buffer
        if self._chunked is not None:
            data = self._chunked.feed(buffer)
            self.complete = self._chunked.done
        elif self._left is not None:
            data = bytes(buffer[: self._left])
            del buffer[: len(data)]
            self._left -= len(data)
            self.complete = self._left == 0
        else:
            data = bytes(buffer)
            buffer.clear()
        return data

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body in the pieces that arrived together; ``complete`` once its end was
        read."""
        connection = self._connection
        while True:
            data = self._take()
            if data:
                yield data
            if self.complete:
                return
            if data:
                continue  # more may have arrived while the piece was being used
            if connection.closed:
                if not self._until_close:
                    detail = f": {connection.error}" if connection.error else ""
                    raise UpstreamHttpError(
                        f"the upstream closed the connection mid-answer{detail}"
                    )
                self.complete, self.keep_alive = True, False
                return
            await connection.receive()

    async def read(self, limit: int = 64 * 1024 * 1024) -> bytes:
        parts: list[bytes] = []
        size = 0
        async for chunk in self.chunks():
            size += len(chunk)
            if size > limit:
                raise UpstreamHttpError(f"the answer is larger than {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    async def line_batches(self) -> AsyncIterator[list[str]]:
        """The body's lines, decoded, without their line ends, in lists of the lines that
        arrived together (for server-sent events: handled as they came, not one by one)."""
        pending = b""
        async for chunk in self.chunks():
            data = pending + chunk if pending else chunk
            cut = data.rfind(b"\n") + 1
            pending = data[cut:]
            if not cut:
                if len(pending) > MAX_LINE_BYTES:
                    raise UpstreamHttpError("the upstream sent an overlong line")
                continue
            # One decode for all the lines: a line end never falls inside a character.
            yield _split_lines(data[:cut].decode("utf-8", "replace"))
        if pending:
            yield _split_lines(pending.decode("utf-8", "replace") + "\n")

    async def lines(self) -> AsyncIterator[str]:
        """The body's lines, decoded, without their line ends, one at a time."""
        async for batch in self.line_batches():
            for line in batch:
                yield line


def _split_lines(text: str) -> list[str]:
    """The lines of ``text``, which ends with a line end, without their line ends."""
    lines = text.split("\n")
    lines.pop()
    if "\r" in text:
        return [line.rstrip("\r") for line in lines]
    return lines


class _Exchange:
    """What ``HttpClient.post`` returns: entered, the answer; left, the connection goes
    back to the pool if the answer was read to its end, and is closed otherwise."""

    __slots__ = ("_client", "_connection", "_origin", "_request", "_response")

    def __init__(self, client: HttpClient, origin: Origin, request: bytes) -> None:
        self._client = client
        self._origin = origin
        self._request = request
        self._connection: _Connection | None = None
        self._response: Response | None = None

    async def __aenter__(self) -> Response:
        client, origin = self._client, self._origin
        connection = client.take_idle(origin) or await client.connect(origin)
        try:
            try:
                response = await _exchange(connection, self._request)
            except _StaleConnection:
                connection.close()
                connection = await client.connect(origin)
                response = await _exchange(connection, self._request)
        except BaseException:
            connection.close()
            raise
        self._connection, self._response = connection, response
        return response

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        connection, response = self._connection, self._response
        assert connection is not None and response is not None
        if exc_type is None and response.complete and response.keep_alive and connection.reusable:
            self._client.release(self._origin, connection)
        else:
            connection.close()


# An origin, the request target (origin form, or absolute form for a proxy), the Host
# header, and the lines a proxy needs in the request (or "").
_Target = tuple[Origin, str, str, str]


@dataclass
class HttpClient:
    """Keep-alive HTTP/1.1 connections, pooled per origin, for one upstream's calls.

    ``tls_context``: None for the system's trusted certificates. ``proxies``: shaped like
    urllib's ``getproxies()``; None reads the environment's, here and only here."""

    timeout_s: float
    connect_timeout_s: float
    max_idle_per_origin: int = 64
    tls_context: ssl.SSLContext | None = None
    proxies: Mapping[str, str] | None = field(default=None, repr=False)
    _idle: dict[Origin, list[_Connection]] = field(default_factory=dict)
    _targets: dict[tuple[str, str | None], _Target] = field(default_factory=dict)
    _routes: ProxyRoutes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        proxies = getproxies_environment() if self.proxies is None else self.proxies
        self._routes = ProxyRoutes.from_mapping(proxies)

    def _tls_context(self) -> ssl.SSLContext:
        if self.tls_context is None:
            self.tls_context = ssl.create_default_context()
        return self.tls_context

    async def connect(self, origin: Origin) -> _Connection:
        if origin.proxy is not None:
            return await self._connect_through(origin.proxy, origin)
        loop = asyncio.get_running_loop()
        tls = self._tls_context() if origin.scheme == "https" else None
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _transport, connection = await loop.create_connection(
                    lambda: _Connection(loop, self.timeout_s),
                    origin.host,
                    origin.port,
                    ssl=tls,
                    server_hostname=origin.server_hostname if tls else None,
                )
        except TimeoutError:
            raise UpstreamHttpTimeout(f"connecting to {origin.host} timed out") from None
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamHttpError(f"connecting to {origin.host} failed: {exc}") from exc
        return connection

    async def _connect_through(self, proxy: Proxy, origin: Origin) -> _Connection:
        """A connection to ``proxy``, tunnelled to ``origin`` when that is https. The deadline
        covers the proxy's answer to CONNECT and the TLS handshake too."""
        loop = asyncio.get_running_loop()
        connection: _Connection | None = None
        where = f"{origin.host} through the proxy {proxy.address}"
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _transport, connection = await loop.create_connection(
                    lambda: _Connection(loop, self.timeout_s), proxy.host, proxy.port
                )
                if origin.scheme == "https":
                    await _open_tunnel(connection, proxy, origin)
                    await connection.start_tls(self._tls_context(), origin.server_hostname)
        except BaseException as exc:
            if connection is not None:
                connection.close()
            if isinstance(exc, TimeoutError):
                raise UpstreamHttpTimeout(f"connecting to {where} timed out") from None
            if isinstance(exc, OSError):  # ssl.SSLError included
                raise UpstreamHttpError(f"connecting to {where} failed: {exc}") from exc
            raise
        return connection

    def take_idle(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            if connection.reusable:
                connection.reused = True
                return connection
            connection.close()
        return None

    def release(self, origin: Origin, connection: _Connection) -> None:
        idle = self._idle.setdefault(origin, [])
        if len(idle) >= self.max_idle_per_origin:
            connection.close()
        else:
            idle.append(connection)

    def _target(self, url: str, server_hostname: str | None) -> _Target:
        """Where ``url`` goes, worked out once per URL."""
        key = (url, server_hostname)
        found = self._targets.get(key)
        if found is None:
            found = self._route(url, server_hostname)
            if len(self._targets) >= _MAX_TARGETS:
                self._targets.clear()
            self._targets[key] = found
        return found

    def _route(self, url: str, server_hostname: str | None) -> _Target:
        """``Origin.of(url, server_hostname)``, through the proxy the environment names for
        it. NO_PROXY is matched against the URL's host (and port, when it names one)."""
        origin, target, host = Origin.of(url, server_hostname)
        proxy = self._routes.proxy_for(origin.scheme, host)
        if proxy is None:
            return origin, target, host, ""
        origin = dataclasses.replace(origin, proxy=proxy)
        if origin.scheme == "https":  # the proxy sees only the CONNECT
            return origin, target, host, ""
        return origin, f"http://{host}{target}", host, proxy.authorization

    def post(
        self,
        url: str,
        body: bytes,
        headers: dict[str, str],
        *,
        server_hostname: str | None = None,
    ) -> _Exchange:
        """POSTs ``body``; ``async with`` the result gives the answer. The connection goes
        back to the pool if the answer was read to its end, and is closed otherwise."""
        origin, target, host, for_proxy = self._target(url, server_hostname)
        head = f"POST {target} HTTP/1.1\r\nHost: {headers.get('Host', host)}\r\n{for_proxy}"
        for name, value in headers.items():
            if name.lower() != "host":
                head += f"{name}: {value}\r\n"
        head += f"Content-Length: {len(body)}\r\n\r\n"
        return _Exchange(self, origin, head.encode("latin-1") + body)

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()


class _StaleConnection(Exception):
    """A pooled connection the server had closed: nothing was answered on it."""


async def _exchange(connection: _Connection, request: bytes) -> Response:
    """Sends ``request`` and reads the answer's head."""
    await connection.send(request)
    buffer = connection.buffer
    while (end := buffer.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES)) < 0:
        if len(buffer) >= MAX_HEAD_BYTES:
            raise UpstreamHttpError("the upstream's answer head is too long")
        if connection.closed:
            if connection.reused and not buffer:
                raise _StaleConnection
            detail = f": {connection.error}" if connection.error else ""
            raise UpstreamHttpError(f"the upstream closed the connection{detail}")
        await connection.receive()
    head = bytes(buffer[:end])
    del buffer[: end + 4]
    return _parse_head(head, connection)


async def _open_tunnel(connection: _Connection, proxy: Proxy, origin: Origin) -> None:
    """Asks ``proxy`` for a tunnel to ``origin``; returns once it answered 2xx."""
    await connection.send(proxy.tunnel_request(origin))
    buffer = connection.buffer
    while (end := buffer.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES)) < 0:
        if len(buffer) >= MAX_HEAD_BYTES:
            raise UpstreamHttpError(f"the proxy {proxy.address}'s answer head is too long")
        if connection.closed:
            raise UpstreamHttpError(f"the proxy {proxy.address} closed the connection")
        await connection.receive()
    status_line = bytes(buffer[: buffer.find(b"\r\n")]).split(b" ", 2)
    del buffer[: end + 4]
    if (
        len(status_line) < 2
        or not status_line[0].startswith(b"HTTP/1.")
        or not status_line[1].isdigit()
    ):
        raise UpstreamHttpError(f"the proxy {proxy.address} did not answer in HTTP/1.1")
    status = int(status_line[1])
    if not 200 <= status < 300:
        hint = " (it wants credentials, or refused those given)" if status == 407 else ""
        raise UpstreamHttpError(
            f"the proxy {proxy.address} refused a tunnel to "
            f"{_bracketed(origin.host)}:{origin.port}: HTTP {status}{hint}"
        )
    if buffer:  # a 2xx answer to CONNECT has no body: nothing may come before TLS
        raise UpstreamHttpError(f"the proxy {proxy.address} sent bytes after its answer")


def _parse_head(head: bytes, connection: _Connection) -> Response:
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
    response = Response(int(status_line[1]), headers, connection)
    if status_line[0] == "HTTP/1.0" and headers.get("connection", "").lower() != "keep-alive":
        response.keep_alive = False
    return response
