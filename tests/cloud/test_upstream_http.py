"""The cloud path's HTTP/1.1 client against raw local servers: every body framing,
connection reuse, stale pooled connections, abandoned answers, deadlines, bad answers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from swarmgate.upstream_http import (
    MAX_BUFFERED_BYTES,
    ChunkedDecoder,
    HttpClient,
    UpstreamHttpError,
    UpstreamHttpTimeout,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Server"], Awaitable[None]]


@dataclass
class Server:
    """A local server that runs ``handler`` for every request on every connection."""

    handler: Handler
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1/chat/completions"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                self.requests.append(head + await reader.readexactly(length))
                await self.handler(reader, writer, self)
                if writer.is_closing():
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[Server]:
    server = Server(handler)
    server.server = await asyncio.start_server(server.serve, "127.0.0.1", 0)
    try:
        yield server
    finally:
        server.server.close()
        await server.server.wait_closed()


def client(timeout_s: float = 5.0) -> HttpClient:
    return HttpClient(timeout_s=timeout_s, connect_timeout_s=2.0)


async def answer(writer: asyncio.StreamWriter, head: str, body: bytes = b"") -> None:
    writer.write(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
    await writer.drain()


async def sized(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _s: Server) -> None:
    await answer(
        writer, "HTTP/1.1 200 OK\nContent-Type: application/json\nContent-Length: 7\n", b'{"a":1}'
    )


async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _s: Server) -> None:
    events = [b"data: one\n\n", b"data: two\r\n\r\ndata: thr", b"ee\n\ndata: [DONE]\n\n"]
    body = b"".join(f"{len(e):x};ext=1\r\n".encode() + e + b"\r\n" for e in events)
    await answer(
        writer,
        "HTTP/1.1 200 OK\nContent-Type: text/event-stream\nTransfer-Encoding: chunked\n",
        body + b"0\r\nX-Trailer: yes\r\n\r\n",
    )


async def until_close(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _s: Server
) -> None:
    await answer(writer, "HTTP/1.0 200 OK\nContent-Type: application/json\n", b'{"b":2}')
    writer.close()


async def test_a_sized_body_is_read_and_the_connection_reused() -> None:
    async with serving(sized) as server:
        http = client()
        for _ in range(5):
            async with http.post(server.url, b'{"q":1}', {"Authorization": "Bearer k"}) as resp:
                assert resp.status == 200
                assert resp.headers["content-type"] == "application/json"
                assert await resp.read() == b'{"a":1}'
        await http.aclose()
    assert server.connections == 1
    first = server.requests[0]
    assert first.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert b"\r\nAuthorization: Bearer k\r\n" in first
    assert b"\r\nContent-Length: 7\r\n" in first
    assert first.endswith(b'\r\n\r\n{"q":1}')


async def test_chunked_server_sent_events_are_split_into_lines_and_the_connection_reused() -> None:
    async with serving(chunked) as server:
        http = client()
        for _ in range(3):
            async with http.post(server.url, b"{}", {}) as resp:
                lines = [line async for line in resp.lines()]
                assert resp.complete
            assert [line for line in lines if line] == [
                "data: one",
                "data: two",
                "data: three",
                "data: [DONE]",
            ]
        await http.aclose()
    assert server.connections == 1


async def test_a_body_that_ends_with_the_connection_is_read_and_not_pooled() -> None:
    async with serving(until_close) as server:
        http = client()
        for _ in range(2):
            async with http.post(server.url, b"{}", {}) as resp:
                assert await resp.read() == b'{"b":2}'
                assert not resp.keep_alive
        await http.aclose()
    assert server.connections == 2


async def test_an_answer_abandoned_midway_closes_its_connection() -> None:
    async def in_two_parts(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server
    ) -> None:
        if len(server.requests) > 1:
            await chunked(reader, writer, server)
            return
        head = "HTTP/1.1 200 OK\nContent-Type: text/event-stream\nTransfer-Encoding: chunked\n"
        await answer(writer, head, b"b\r\ndata: one\n\n\r\n")
        await asyncio.sleep(0.2)  # the rest comes later: the client has left by then
        writer.write(b"0\r\n\r\n")

    async with serving(in_two_parts) as server:
        http = client()
        async with http.post(server.url, b"{}", {}) as resp:
            async for _line in resp.lines():
                break
            assert not resp.complete
        async with http.post(server.url, b"{}", {}) as resp:
            assert [line async for line in resp.lines() if line][-1] == "data: [DONE]"
        await http.aclose()
    assert server.connections == 2


async def test_a_pooled_connection_the_server_closed_is_replaced_transparently() -> None:
    async def once_then_close(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server
    ) -> None:
        await sized(reader, writer, server)
        writer.close()  # a keep-alive answer, then the server drops the idle connection

    async with serving(once_then_close) as server:
        http = client()
        for _ in range(3):
            async with http.post(server.url, b"{}", {}) as resp:
                assert await resp.read() == b'{"a":1}'
            await asyncio.sleep(0.05)
        await http.aclose()
    assert server.connections == 3
    assert len(server.requests) == 3  # each request sent once to a live connection


async def test_a_server_that_stops_answering_is_a_timeout() -> None:
    async def silent(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _s: Server
    ) -> None:
        await asyncio.sleep(10)

    async def stalls_midway(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _s: Server
    ) -> None:
        await answer(writer, "HTTP/1.1 200 OK\nContent-Length: 100\n", b"partial")
        await asyncio.sleep(10)

    for handler in (silent, stalls_midway):
        async with serving(handler) as server:
            http = client(timeout_s=0.3)
            with pytest.raises(UpstreamHttpTimeout):
                async with http.post(server.url, b"{}", {}) as resp:
                    await resp.read()
            await http.aclose()


@pytest.mark.parametrize(
    "raw",
    [
        b"SMTP ready\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\nshort",
    ],
)
async def test_what_is_not_http_is_an_error(raw: bytes) -> None:
    async def bad(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _s: Server) -> None:
        writer.write(raw)
        await writer.drain()
        writer.close()

    async with serving(bad) as server:
        http = client(timeout_s=2)
        with pytest.raises(UpstreamHttpError):
            async with http.post(server.url, b"{}", {}) as resp:
                await resp.read()
        await http.aclose()


async def test_nobody_listening_is_an_error() -> None:
    async with serving(sized) as server:
        url = server.url
    http = client()
    with pytest.raises(UpstreamHttpError):
        async with http.post(url, b"{}", {}):
            pass
    with pytest.raises(UpstreamHttpError):
        async with http.post("ftp://127.0.0.1/x", b"{}", {}):
            pass


async def test_a_reused_connection_dropped_without_an_answer_is_retried_once() -> None:
    async def second_request_dropped(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server: Server
    ) -> None:
        if len(server.requests) == 2:
            writer.close()  # the idle connection's end raced the client's next request
            return
        await sized(reader, writer, server)

    async with serving(second_request_dropped) as server:
        http = client()
        for _ in range(2):
            async with http.post(server.url, b"{}", {}) as resp:
                assert await resp.read() == b'{"a":1}'
        await http.aclose()
    assert server.connections == 2
    assert len(server.requests) == 3


async def test_a_new_connection_dropped_without_an_answer_is_an_error() -> None:
    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _s: Server) -> None:
        writer.close()

    async with serving(drop) as server:
        http = client()
        with pytest.raises(UpstreamHttpError):
            async with http.post(server.url, b"{}", {}):
                pass
        await http.aclose()
    assert len(server.requests) == 1  # never sent twice on a connection of its own


async def test_a_stream_that_keeps_sending_is_not_a_timeout() -> None:
    """The deadline is for silence, not for the whole answer."""

    async def steady(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _s: Server
    ) -> None:
        head = "HTTP/1.1 200 OK\nContent-Type: text/event-stream\nTransfer-Encoding: chunked\n"
        await answer(writer, head)
        for n in range(6):
            event = f"data: {n}\n\n".encode()
            writer.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
            await writer.drain()
            await asyncio.sleep(0.1)
        writer.write(b"0\r\n\r\n")

    async with serving(steady) as server:
        http = client(timeout_s=0.3)
        async with http.post(server.url, b"{}", {}) as resp:
            lines = [line async for line in resp.lines() if line]
        await http.aclose()
    assert lines == [f"data: {n}" for n in range(6)]


async def test_lines_that_arrive_together_come_as_one_batch() -> None:
    async def two_reads(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _s: Server
    ) -> None:
        # "é" (two bytes) split between the reads; CRLF line ends in the first.
        first, second = b"data: 1\r\n\r\ndata: caf\xc3", b"\xa9\n\ndata: [DONE]\n\n"
        await answer(writer, f"HTTP/1.1 200 OK\nContent-Length: {len(first + second)}\n")
        writer.write(first)
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(second)

    async with serving(two_reads) as server:
        http = client()
        async with http.post(server.url, b"{}", {}) as resp:
            batches = [batch async for batch in resp.line_batches()]
            assert resp.complete
        await http.aclose()
    assert batches == [["data: 1", ""], ["data: café", "", "data: [DONE]", ""]]


def chunked_body(pieces: list[bytes], trailer: bytes = b"") -> bytes:
    return b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in pieces) + (
        b"0\r\n" + trailer + b"\r\n"
    )


PIECES = [b"data: one\n\n", b"x" * 300, b"data: two\r\n\r\n", b"\xc3\xa9"]


@pytest.mark.parametrize("step", [1, 2, 3, 7, 16, 100, 10_000])
def test_a_chunked_body_decodes_however_it_is_split(step: int) -> None:
    raw = chunked_body(PIECES, b"X-Trailer: yes\r\n") + b"NEXT"
    decoder = ChunkedDecoder()
    buffer = bytearray()
    body = b""
    for at in range(0, len(raw), step):
        buffer += raw[at : at + step]
        body += decoder.feed(buffer)
        if decoder.done:
            break
    assert decoder.done
    assert body == b"".join(PIECES)
    assert bytes(buffer) == raw[raw.index(b"NEXT") : at + step]  # what follows is left alone


def test_chunk_extensions_are_ignored() -> None:
    decoder = ChunkedDecoder()
    buffer = bytearray(b"5;name=value\r\nhello\r\n0\r\n\r\n")
    assert decoder.feed(buffer) == b"hello"
    assert decoder.done and not buffer


@pytest.mark.parametrize("raw", [b"zz\r\n", b"-5\r\nhello\r\n", b";ext\r\n", b"1" * 5000])
def test_a_bad_chunk_header_is_an_error(raw: bytes) -> None:
    with pytest.raises(UpstreamHttpError):
        ChunkedDecoder().feed(bytearray(raw))


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_a_body_larger_than_the_receive_buffer_is_read_whole(framing: str) -> None:
    """Reading pauses while more than MAX_BUFFERED_BYTES wait, and resumes as they are
    taken."""
    body = bytes(range(256)) * (3 * MAX_BUFFERED_BYTES // 256 + 7)

    async def large(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _s: Server) -> None:
        if framing == "length":
            await answer(writer, f"HTTP/1.1 200 OK\nContent-Length: {len(body)}\n", body)
            return
        step = 100_000
        pieces = [body[at : at + step] for at in range(0, len(body), step)]
        await answer(writer, "HTTP/1.1 200 OK\nTransfer-Encoding: chunked\n", chunked_body(pieces))

    async with serving(large) as server:
        http = client()
        for _ in range(2):
            async with http.post(server.url, b"{}", {}) as resp:
                received = b""
                async for piece in resp.chunks():
                    if not received:
                        await asyncio.sleep(0.2)  # a slow reader: the rest piles up meanwhile
                    received += piece
                assert received == body
        await http.aclose()
    assert server.connections == 1
