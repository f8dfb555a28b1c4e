"""Direct links between gateways: the attempts that cross them, without Redis in between.

Through Redis, a frame from one gateway to another wakes three processes (the sender's
Redis connection, the Redis server, the receiver) and costs two traversals each way; on
a link it is one write on a TCP connection the two gateways keep open. Presence,
liveness and everything stored stay in Redis; only the messages of ``cluster/mesh.py``
for one peer (a job or cancel for its device, the device's frames back) take the link
when there is one, and Redis pub/sub otherwise.

Each gateway with ``SWARMGATE_CLUSTER_LINK_PORT`` listens on it and advertises
``host:port`` with its liveness key. Every pair of live gateways gets one link, dialled
by the gateway whose id sorts first, as soon as each sees the other alive (within a
liveness interval); until then, and whenever it is down, messages go through Redis.

On the wire: the listener sends ``SGL1`` and a random nonce; the dialler answers with a
frame ``H|<its id>|<HMAC-SHA256 of the nonce and its id under the shared secret>``; the
listener checks it and answers ``O|<its id>``, or closes. Then both ways carry frames:
a 4-byte big-endian length, then a mesh message (``kind|gateway|device|payload``).

A link that breaks takes its attempts with it: the mesh fails over the attempts it runs
on the peer's devices and cancels the relays whose jobs came over it (``on_lost``), as
when a gateway dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import logging
import secrets
import socket
import struct
from collections.abc import Callable

log = logging.getLogger("swarmgate.cluster")

_HEADER = struct.Struct(">I")
_GREETING = b"SGL1"
_NONCE_BYTES = 16
_HANDSHAKE_TIMEOUT_S = 5.0
_DIAL_TIMEOUT_S = 3.0
# A peer that reads nothing while this much waits for it is taken for broken.
MAX_BUFFERED = 32 * 1024 * 1024


def _proof(secret: bytes, nonce: bytes, gateway_id: str) -> str:
    return hmac.new(secret, nonce + gateway_id.encode(), hashlib.sha256).hexdigest()


class LinkRefused(Exception):
    """The other end is not a gateway of this network (or not the one expected)."""


class Link:
    """One open link to a peer gateway."""

    def __init__(self, peer: str, writer: asyncio.StreamWriter) -> None:
        self.peer = peer
        self._writer = writer
        self.closed = False
        self.sent = 0
        self.received = 0

    def send(self, data: bytes) -> bool:
        """Queues one message; False if the link is closed (or just broke)."""
        if self.closed:
            return False
        transport = self._writer.transport
        if transport.is_closing() or transport.get_write_buffer_size() > MAX_BUFFERED:
            self.close()
            return False
        self._writer.write(_HEADER.pack(len(data)) + data)
        self.sent += 1
        return True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._writer.close()


MessageHandler = Callable[[bytes, Link], None]
LostHandler = Callable[[Link], None]


class Links:
    """The listener and the open links of one gateway."""

    def __init__(
        self,
        gateway_id: str,
        *,
        secret: str,
        port: int,
        bind: str = "0.0.0.0",
        host: str = "",
        max_frame_bytes: int,
        on_message: MessageHandler,
        on_lost: LostHandler,
    ) -> None:
        self.gateway_id = gateway_id
        self._secret = secret.encode()
        self._port, self._bind = port, bind
        self._host = host or socket.gethostname()
        self._max_frame = max_frame_bytes
        self._on_message, self._on_lost = on_message, on_lost
        self._server: asyncio.Server | None = None
        self._links: dict[str, Link] = {}
        self._dialling: dict[str, asyncio.Task[None]] = {}
        self._readers: set[asyncio.Task[None]] = set()
        self.address = ""

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self._bind, self._port)
        port = self._server.sockets[0].getsockname()[1]
        self.address = f"{self._host}:{port}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._dialling.values()):
            task.cancel()
        for link in list(self._links.values()):
            link.close()
        for task in list(self._readers) + list(self._dialling.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    # -- use --------------------------------------------------------------------------------
    def get(self, peer: str) -> Link | None:
        link = self._links.get(peer)
        return None if link is None or link.closed else link

    def keep_up(self, peers: dict[str, str]) -> None:
        """Dials the live peers (id → advertised address) this gateway should link to and
        is not linked to: those whose id sorts after its own (the others dial it)."""
        for peer, address in peers.items():
            if (
                peer > self.gateway_id
                and address
                and self.get(peer) is None
                and peer not in self._dialling
            ):
                task = asyncio.get_running_loop().create_task(self._dial(peer, address))
                self._dialling[peer] = task
                task.add_done_callback(functools.partial(self._dialled, peer))

    def _dialled(self, peer: str, _task: asyncio.Task[None]) -> None:
        self._dialling.pop(peer, None)

    def drop(self, peer: str) -> None:
        """A peer is dead: its link goes too."""
        link = self._links.get(peer)
        if link is not None:
            link.close()

    # -- both ends ----------------------------------------------------------------------------
    async def _dial(self, peer: str, address: str) -> None:
        host, _, port = address.rpartition(":")
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, int(port)), _DIAL_TIMEOUT_S
            )
        except (OSError, TimeoutError, ValueError) as exc:
            log.warning(
                "a link to another gateway could not be opened: %s",
                type(exc).__name__,
                extra={"gateway_id": peer},
            )
            return
        try:
            async with asyncio.timeout(_HANDSHAKE_TIMEOUT_S):
                greeting = await reader.readexactly(len(_GREETING) + _NONCE_BYTES)
                if not greeting.startswith(_GREETING):
                    raise LinkRefused("not a gateway link")
                nonce = greeting[len(_GREETING) :]
                hello = f"H|{self.gateway_id}|{_proof(self._secret, nonce, self.gateway_id)}"
                writer.write(_frame(hello.encode()))
                answer = await self._read_frame(reader)
                if answer != b"O|" + peer.encode():
                    raise LinkRefused("the other end refused the link, or is another gateway")
        except (OSError, TimeoutError, asyncio.IncompleteReadError, LinkRefused) as exc:
            log.warning(
                "a link to another gateway failed its handshake: %s",
                type(exc).__name__,
                extra={"gateway_id": peer},
            )
            writer.close()
            return
        self._open(peer, reader, writer)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonce = secrets.token_bytes(_NONCE_BYTES)
        try:
            async with asyncio.timeout(_HANDSHAKE_TIMEOUT_S):
                writer.write(_GREETING + nonce)
                hello = (await self._read_frame(reader)).decode()
            kind, peer, proof = hello.split("|", 2)
            expected = _proof(self._secret, nonce, peer)
            if kind != "H" or not peer or not hmac.compare_digest(proof, expected):
                raise LinkRefused("a link with a wrong secret")
        except (
            OSError,
            TimeoutError,
            asyncio.IncompleteReadError,
            UnicodeDecodeError,
            ValueError,
            LinkRefused,
        ) as exc:
            log.warning("a link from another gateway was refused: %s", type(exc).__name__)
            writer.close()
            return
        writer.write(_frame(b"O|" + self.gateway_id.encode()))
        self._open(peer, reader, writer)

    def _open(self, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        previous = self._links.get(peer)
        if previous is not None:
            previous.close()
        with contextlib.suppress(OSError):
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = Link(peer, writer)
        self._links[peer] = link
        task = asyncio.get_running_loop().create_task(self._read_loop(link, reader))
        self._readers.add(task)
        task.add_done_callback(self._readers.discard)
        log.info("linked to another gateway", extra={"gateway_id": peer})

    async def _read_loop(self, link: Link, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                data = await self._read_frame(reader)
                link.received += 1
                try:
                    self._on_message(data, link)
                except Exception:
                    log.exception("a message from another gateway could not be handled")
        except (OSError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            link.close()
            if self._links.get(link.peer) is link:
                del self._links[link.peer]
            self._on_lost(link)

    async def _read_frame(self, reader: asyncio.StreamReader) -> bytes:
        (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
        if size > self._max_frame:
            raise ValueError(f"a link frame of {size} bytes is over the limit")
        return await reader.readexactly(size)


def _frame(data: bytes) -> bytes:
    return _HEADER.pack(len(data)) + data
