"""The cloud path's HTTP client behind an egress proxy set in the environment: a local
stand-in proxy (CONNECT tunnels and absolute-form requests, recording what it was asked)
in front of local upstreams, one of them speaking TLS with a certificate made here."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import ipaddress
import ssl
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from swarmgate.upstream_http import (
    HttpClient,
    UpstreamHttpError,
    UpstreamHttpTimeout,
    bypasses_proxy,
)
from tests.cloud.test_upstream_http import Handler, Server, serving, sized

PATH = "/v1/chat/completions"


# -- a TLS upstream -------------------------------------------------------------------------


@dataclass(frozen=True)
class Tls:
    server: ssl.SSLContext  # the upstream's: a certificate for 127.0.0.1 and upstream.test
    client: ssl.SSLContext  # trusts only the authority that signed it


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    extensions: list[tuple[x509.ExtensionType, bool]],
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    authority_key = ec.generate_private_key(ec.SECP256R1())
    authority = _certificate(
        "test authority",
        authority_key,
        "test authority",
        authority_key,
        [
            (x509.BasicConstraints(ca=True, path_length=0), True),
            (x509.SubjectKeyIdentifier.from_public_key(authority_key.public_key()), False),
        ],
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = _certificate(
        "upstream.test",
        key,
        "test authority",
        authority_key,
        [
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("upstream.test"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    ]
                ),
                False,
            ),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
            (
                x509.AuthorityKeyIdentifier.from_issuer_public_key(authority_key.public_key()),
                False,
            ),
        ],
    )
    directory: Path = tmp_path_factory.mktemp("tls")
    (directory / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (directory / "leaf.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(directory / "leaf.pem", directory / "leaf.key")
    client = ssl.create_default_context(
        cadata=authority.public_bytes(serialization.Encoding.PEM).decode()
    )
    return Tls(server, client)


@contextlib.asynccontextmanager
async def serving_tls(handler: Handler, tls: Tls) -> AsyncIterator[tuple[Server, str]]:
    """An upstream speaking TLS, and the https URL it answers on."""
    server = Server(handler)
    server.server = await asyncio.start_server(server.serve, "127.0.0.1", 0, ssl=tls.server)
    port = server.server.sockets[0].getsockname()[1]
    try:
        yield server, f"https://127.0.0.1:{port}{PATH}"
    finally:
        server.server.close()
        await server.server.wait_closed()


# -- a proxy --------------------------------------------------------------------------------


@dataclass
class ProxyStandIn:
    """A local HTTP proxy. It tunnels a CONNECT to the address named and forwards an
    absolute-form request to the origin named, keeping each connection to one origin; it
    records the first request line and Proxy-Authorization of every connection.
    ``refusal``: the answer to every request instead; ``silent``: it never answers."""

    refusal: bytes | None = None
    silent: bool = False
    request_lines: list[str] = field(default_factory=list)
    authorizations: list[str | None] = field(default_factory=list)
    server: asyncio.Server | None = None
    # Each connection's handler, and its side of the connection to the client.
    handlers: dict[asyncio.Task[None], asyncio.StreamWriter] = field(default_factory=dict)

    def url(self, credentials: str = "") -> str:
        assert self.server is not None
        return f"http://{credentials}127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers[task] = writer
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            self.request_lines.append(lines[0])
            self.authorizations.append(
                next(
                    (
                        line.split(":", 1)[1].strip()
                        for line in lines
                        if line.lower().startswith("proxy-authorization:")
                    ),
                    None,
                )
            )
            if self.silent:
                await reader.read()  # until the client gives up
                return
            if self.refusal is not None:
                writer.write(self.refusal)
                await writer.drain()
                return
            method, target, _version = lines[0].split(" ")
            if method == "CONNECT":
                host, port = target.rsplit(":", 1)
                origin_reader, origin_writer = await asyncio.open_connection(host, int(port))
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                parts = urlsplit(target)
                origin_reader, origin_writer = await asyncio.open_connection(
                    parts.hostname, parts.port
                )
                origin_writer.write(head)
            await asyncio.gather(pipe(reader, origin_writer), pipe(origin_reader, writer))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self.handlers.pop(task, None)


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def proxying(proxy: ProxyStandIn | None = None) -> AsyncIterator[ProxyStandIn]:
    proxy = proxy or ProxyStandIn()
    proxy.server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
    try:
        yield proxy
    finally:
        proxy.server.close()
        handlers = list(proxy.handlers)
        for writer in proxy.handlers.values():
            writer.close()  # the handler sees the end of its connection and returns
        if handlers:
            await asyncio.wait(handlers, timeout=2)
        await proxy.server.wait_closed()


def basic(user_pass: str) -> str:
    return "Basic " + base64.b64encode(user_pass.encode()).decode()


def client(tls: Tls | None = None, *, connect_timeout_s: float = 2.0) -> HttpClient:
    return HttpClient(
        timeout_s=5.0,
        connect_timeout_s=connect_timeout_s,
        tls_context=tls.client if tls is not None else None,
    )


async def post_twice(http: HttpClient, url: str, server_hostname: str | None = None) -> None:
    for _ in range(2):
        async with http.post(url, b"{}", {}, server_hostname=server_hostname) as resp:
            assert await resp.read() == b'{"a":1}'
    await http.aclose()


# -- https: a CONNECT tunnel ----------------------------------------------------------------


async def two_requests_through_a_tunnel(
    tls: Tls, monkeypatch: pytest.MonkeyPatch, variables: dict[str, str]
) -> tuple[ProxyStandIn, Server, str]:
    """Two requests to a TLS upstream with ``variables`` set ("{proxy}" in a value: the
    stand-in's URL) and the client made after them."""
    async with proxying() as proxy, serving_tls(sized, tls) as (upstream, url):
        for name, value in variables.items():
            monkeypatch.setenv(name, value.replace("{proxy}", proxy.url("user:p%40ss@")))
        await post_twice(client(tls), url)
    return proxy, upstream, url


@pytest.mark.parametrize(
    "variables",
    [
        {"HTTPS_PROXY": "{proxy}"},
        {"HTTPS_PROXY": "http://127.0.0.1:9", "https_proxy": "{proxy}"},  # lowercase wins
        {"ALL_PROXY": "{proxy}"},  # for a scheme without a proxy of its own
        {"HTTPS_PROXY": "{proxy}", "NO_PROXY": "localhost,upstream.test"},  # not listed
    ],
)
async def test_https_goes_through_one_authenticated_tunnel_that_is_reused(
    tls: Tls, monkeypatch: pytest.MonkeyPatch, variables: dict[str, str]
) -> None:
    proxy, upstream, url = await two_requests_through_a_tunnel(tls, monkeypatch, variables)
    authority = urlsplit(url).netloc
    assert proxy.request_lines == [f"CONNECT {authority} HTTP/1.1"]
    assert proxy.authorizations == [basic("user:p@ss")]
    assert upstream.connections == 1
    assert len(upstream.requests) == 2
    first = upstream.requests[0]
    assert first.startswith(f"POST {PATH} HTTP/1.1\r\nHost: {authority}\r\n".encode())
    assert b"proxy-authorization" not in first.lower()  # for the proxy only


def test_a_tunnel_works_on_uvloop(tls: Tls, monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway runs on uvloop, whose start_tls is its own."""
    uvloop = pytest.importorskip("uvloop")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        proxy, upstream, _url = runner.run(
            two_requests_through_a_tunnel(tls, monkeypatch, {"HTTPS_PROXY": "{proxy}"})
        )
    assert len(proxy.request_lines) == 1
    assert upstream.connections == 1 and len(upstream.requests) == 2


async def test_a_tunnel_to_a_checked_address_verifies_the_upstreams_name(
    tls: Tls, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As for a developer's base URL pinned by the address guard: the proxy is asked for
    the address, and TLS checks the name."""
    async with proxying() as proxy, serving_tls(sized, tls) as (upstream, url):
        monkeypatch.setenv("HTTPS_PROXY", proxy.url())
        await post_twice(client(tls), url, server_hostname="upstream.test")
        http = client(tls)
        with pytest.raises(UpstreamHttpError, match="through the proxy") as caught:
            async with http.post(url, b"{}", {}, server_hostname="elsewhere.test"):
                pass
        await http.aclose()
    assert not isinstance(caught.value, UpstreamHttpTimeout)
    authority = urlsplit(url).netloc
    assert proxy.request_lines == [f"CONNECT {authority} HTTP/1.1"] * 2
    assert proxy.authorizations == [None, None]
    assert upstream.requests[0].startswith(f"POST {PATH} HTTP/1.1\r\nHost: {authority}".encode())


async def test_a_tunnelled_connection_dropped_without_an_answer_is_retried_once(
    tls: Tls, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def second_request_dropped(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server
    ) -> None:
        if len(server.requests) == 2:
            writer.close()  # the idle connection's end raced the client's next request
            return
        await sized(reader, writer, server)

    async with proxying() as proxy, serving_tls(second_request_dropped, tls) as (upstream, url):
        monkeypatch.setenv("HTTPS_PROXY", proxy.url())
        await post_twice(client(tls), url)
    assert len(proxy.request_lines) == 2  # a new tunnel for the retry
    assert upstream.connections == 2
    assert len(upstream.requests) == 3


# -- http: absolute form --------------------------------------------------------------------


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"])
async def test_http_is_sent_to_the_proxy_in_absolute_form(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    async with proxying() as proxy, serving(sized) as upstream:
        monkeypatch.setenv(variable, proxy.url("user:pw@"))
        await post_twice(client(), upstream.url)
        authority = urlsplit(upstream.url).netloc
    assert proxy.request_lines == [f"POST http://{authority}{PATH} HTTP/1.1"]
    assert proxy.authorizations == [basic("user:pw")]
    assert upstream.connections == 1  # one connection to the proxy, pooled
    for request in upstream.requests:  # as the proxy forwarded them, untouched
        assert request.startswith(
            f"POST http://{authority}{PATH} HTTP/1.1\r\nHost: {authority}\r\n"
            f"Proxy-Authorization: {basic('user:pw')}\r\n".encode()
        )


async def test_an_https_proxy_alone_leaves_http_direct(monkeypatch: pytest.MonkeyPatch) -> None:
    async with proxying() as proxy, serving(sized) as upstream:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url())
        await post_twice(client(), upstream.url)
    assert proxy.request_lines == []
    assert upstream.requests[0].startswith(f"POST {PATH} HTTP/1.1\r\n".encode())


# -- NO_PROXY -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("no_proxy", "direct"),
    [
        ("127.0.0.1", True),
        ("*", True),
        ("127.0.0.1:{port}", True),
        ("other.test, .0.0.1", True),  # a suffix, as urllib reads it
        ("localhost", False),  # nothing is bypassed unless listed
        ("127.0.0.1:1", False),
        ("127.0.0.0/8", False),  # entries are names, not ranges
    ],
)
async def test_no_proxy_decides_which_hosts_go_direct(
    tls: Tls, monkeypatch: pytest.MonkeyPatch, no_proxy: str, direct: bool
) -> None:
    async with (
        proxying() as proxy,
        serving(sized) as plain,
        serving_tls(sized, tls) as (secure, secure_url),
    ):
        monkeypatch.setenv("HTTP_PROXY", proxy.url())
        monkeypatch.setenv("HTTPS_PROXY", proxy.url())
        for upstream, url in ((plain, plain.url), (secure, secure_url)):
            port = urlsplit(url).port
            monkeypatch.setenv("NO_PROXY", no_proxy.replace("{port}", str(port)))
            await post_twice(client(tls), url)
            origin_form = upstream.requests[0].startswith(f"POST {PATH} ".encode())
            assert origin_form == (direct or upstream is secure)
    assert len(proxy.request_lines) == (0 if direct else 2)


@pytest.mark.parametrize(
    ("host", "no_proxy", "bypassed"),
    [
        ("api.example.com", "example.com", True),
        ("api.example.com", ".example.com", True),
        ("example.com", ".example.com", True),
        ("badexample.com", "example.com", False),
        ("example.com:8443", "example.com", True),
        ("example.com:8443", "example.com:8443", True),
        ("api.example.com:8443", "example.com:8443", True),
        ("example.com", "example.com:8443", False),
        ("example.com:443", "example.com:8443", False),
        ("API.Example.com", "example.COM", True),
        ("127.0.0.1", "localhost", False),
        ("localhost", "127.0.0.1", False),
        ("127.0.0.1", "127.0.0.1", True),
        ("10.1.2.3", "10.0.0.0/8", False),
        ("anything.test", "*", True),
        ("anything.test", "*.test", False),
        ("anything.test", "*, other.test", False),
        ("a.test", " other.test , a.test ", True),
        ("a.test", ",, ,", False),
        ("[::1]:8080", "[::1]", True),
        ("[::1]", "::1", False),
    ],
)
def test_no_proxy_entries_match_as_urllib_matches_them(
    host: str, no_proxy: str, bypassed: bool
) -> None:
    assert bypasses_proxy(host, no_proxy) is bypassed
    assert bool(urllib.request.proxy_bypass_environment(host, {"no": no_proxy})) is bypassed  # type: ignore[attr-defined]


# -- failures -------------------------------------------------------------------------------


async def test_a_proxy_refusing_the_tunnel_is_an_error_that_keeps_the_password_out(
    tls: Tls, monkeypatch: pytest.MonkeyPatch
) -> None:
    refusal = (
        b"HTTP/1.1 407 Proxy Authentication Required\r\n"
        b'Proxy-Authenticate: Basic realm="egress"\r\nContent-Length: 0\r\n\r\n'
    )
    async with proxying(ProxyStandIn(refusal=refusal)) as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url("user:s3cret@"))
        address = proxy.url().removeprefix("http://")
        http = client(tls)
        with pytest.raises(UpstreamHttpError) as caught:
            async with http.post(f"https://upstream.test{PATH}", b"{}", {}):
                pass
        await http.aclose()
    message = str(caught.value)
    assert not isinstance(caught.value, UpstreamHttpTimeout)
    assert "HTTP 407" in message and address in message
    assert "upstream.test:443" in message
    for secret in ("s3cret", basic("user:s3cret").split()[1]):
        assert secret not in message
        assert secret not in repr(http)


async def test_a_proxy_that_never_answers_connect_is_a_timeout(
    tls: Tls, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with proxying(ProxyStandIn(silent=True)) as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url())
        http = client(tls, connect_timeout_s=0.3)
        started = time.monotonic()
        with pytest.raises(UpstreamHttpTimeout, match="through the proxy"):
            async with http.post(f"https://upstream.test{PATH}", b"{}", {}):
                pass
        await http.aclose()
    assert time.monotonic() - started < 2
    assert proxy.request_lines == ["CONNECT upstream.test:443 HTTP/1.1"]


async def test_a_proxy_nobody_listens_on_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    async with proxying() as proxy:
        gone = proxy.url()
    monkeypatch.setenv("HTTP_PROXY", gone)
    http = client()
    with pytest.raises(UpstreamHttpError, match="through the proxy"):
        async with http.post(f"http://upstream.test{PATH}", b"{}", {}):
            pass


@pytest.mark.parametrize(
    "url",
    [
        "https://user:s3cret@proxy.test:3128",
        "socks5://user:s3cret@proxy.test:1080",
        "http://user:s3cret@proxy.test:99999",
        "http://user:s3cret@:3128",
    ],
)
def test_a_proxy_url_this_client_cannot_use_is_refused_when_it_is_made(
    monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", url)
    with pytest.raises(UpstreamHttpError, match="HTTPS_PROXY") as caught:
        client()
    assert "s3cret" not in str(caught.value)


async def test_the_environment_is_read_once_when_the_client_is_made(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with proxying() as proxy, serving(sized) as upstream:
        http = client()
        monkeypatch.setenv("HTTP_PROXY", proxy.url())
        await post_twice(http, upstream.url)
    assert proxy.request_lines == []
