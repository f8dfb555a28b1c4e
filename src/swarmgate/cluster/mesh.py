"""Several gateways, one network: device presence and cross-gateway dispatch over Redis.

A device keeps its WebSocket to one gateway, its *holder*. The holder writes the
device's presence record to Redis (with a TTL it keeps refreshing) and announces joins,
changes and leaves on the presence channel. Every other gateway keeps a ``RemoteDevice``
for it in its own registry, so routing, failover, billing and trust see one list of
devices whatever gateway a request arrives at.

An attempt on a remote device goes like this::

    origin gateway                      Redis                         holder gateway
    Execution → RemoteDevice.send ──→ inbox:{holder}  "D" job ──→ relay → device WebSocket
    channel ← "F" delta/done/error ←── inbox:{origin} ←── relay ← device frames
    cancel → RemoteDevice.send ──→ inbox:{holder}  "D" cancel ──→ device; relay ends

Each gateway refreshes a liveness key every second (TTL five seconds). When a peer's key
is gone, the others drop its devices: attempts running on them get ``DeviceLost`` and
fail over like any other lost device, and relays for requests that came from the dead
gateway are cancelled on their devices. Messages on pub/sub are not stored; a frame lost
with a dead gateway shows up as that gateway's death or the attempt's timeout, both of
which fail over. Frames of one attempt keep their order: each gateway publishes through
one connection, in order.

Each gateway counts the slots its own requests use on a remote device; the holder, which
sees them all, declines a job the device has no slot for (``NODE_BUSY``, a refusal that
fails over without a cooldown).

Message format on a channel: ``kind|gateway|device|payload`` (ids never contain ``|``).
Kinds: ``D`` frame for a device (job or cancel), ``F`` frame from a device, ``L``
attempt lost (payload ``attempt\\nreason``), ``P`` presence record, ``X`` device left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson
from pydantic import ValidationError
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError

from swarmgate.cluster.keys import ClusterKeys
from swarmgate.cluster.links import Link, Links
from swarmgate.config import GatewaySettings
from swarmgate.errors import DeviceGone
from swarmgate.protocol import Delta, Done, JobError, node_frame_adapter
from swarmgate.routing.profile import DeviceProfile
from swarmgate.routing.registry import AttemptEvent, DeviceConnection, DeviceLost, DeviceRegistry
from swarmgate.routing.states import ConnectionState

log = logging.getLogger("swarmgate.cluster")

ProfileLoader = Callable[[str, str, str], Awaitable[DeviceProfile]]

# Drops a device record, its gateway's membership and its model index entries, only if
# the record still names that gateway (the device may have connected elsewhere since).
# KEYS: record, gateway's device set. ARGV: gateway id, device id.
_FORGET = """
local record = redis.call('GET', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[2])
if not record then return 0 end
local ok, decoded = pcall(cjson.decode, record)
if not ok or decoded['gateway'] ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
for _, model in ipairs(decoded['models']) do
  redis.call('SREM', ARGV[3] .. model, ARGV[2])
end
return 1
"""


@dataclass(eq=False)
class RemoteDevice(DeviceConnection):
    """A device connected to another gateway (its holder), as this gateway sees it."""

    local: ClassVar[bool] = False
    holder: str = ""
    mesh: Mesh | None = field(default=None, repr=False)

    def send(self, text: str) -> None:
        if self.state is ConnectionState.CLOSED or self.mesh is None:
            raise DeviceGone(f"device {self.device_id} is disconnected")
        self.mesh.to_holder(self, text)


class _Relay(asyncio.Queue[AttemptEvent]):
    """Stands in, on the holder, for the channel of an attempt another gateway runs: each
    frame the device sends for it goes straight back to that gateway."""

    def __init__(
        self,
        mesh: Mesh,
        origin: str,
        device: DeviceConnection,
        attempt_id: str,
        via: Link | None,
    ):
        super().__init__()
        self.mesh, self.origin, self.device, self.attempt_id = mesh, origin, device, attempt_id
        # The job came over this link (None: through Redis); every frame goes back the same
        # way, so they keep their order.
        self.via = via

    def put_nowait(self, item: AttemptEvent) -> None:
        mesh = self.mesh
        if isinstance(item, DeviceLost):
            mesh.lost(self.origin, self.device.device_id, self.attempt_id, item.reason, self.via)
        else:
            mesh.publish_frame(self.origin, self.device.device_id, item.model_dump_json(), self.via)
            if isinstance(item, Delta):
                return
        # Ended: free the slot once the caller (who may be iterating the device's
        # attempts) is done.
        asyncio.get_running_loop().call_soon(mesh.end_relay, self)


def command_client(settings: GatewaySettings) -> Redis:
    """The gateway's Redis client for commands: a bounded pool that makes a command wait
    for a free connection under load rather than fail (redis-py's default pool refuses a
    command past 100 connections in use)."""
    pool = BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=settings.redis_max_connections,
        timeout=settings.redis_pool_wait_s,
    )
    return Redis.from_pool(pool)


class Mesh:
    """This gateway's part in a network of gateways sharing one Redis."""

    def __init__(
        self,
        settings: GatewaySettings,
        registry: DeviceRegistry,
        profile_for: ProfileLoader,
        redis: Redis | None = None,
    ) -> None:
        self.settings = settings
        self.gateway_id = settings.gateway_id or f"gw_{secrets.token_hex(5)}"
        self.keys = ClusterKeys(settings.redis_prefix)
        self.redis: Redis = redis or command_client(settings)
        self._registry = registry
        self._profile_for = profile_for
        self._inbox = self.keys.inbox(self.gateway_id).encode()
        self._me = self.gateway_id.encode()
        # Outgoing messages, published in order by one task through one connection.
        self._outbox: deque[tuple[bytes, bytes]] = deque()
        self._commands: deque[Callable[[Any], object]] = deque()
        self._wake = asyncio.Event()
        self._publisher: Any = None  # a connection of its own, made on first use
        # Attempts this gateway runs for others: attempt id → relay.
        self._relays: dict[str, _Relay] = {}
        # Peer gateway → ids of its devices held here as RemoteDevice.
        self._peers: dict[str, set[str]] = {}
        # Device id → newest presence record still loading (its profile is being read).
        self._joining: dict[str, tuple[str, dict[str, Any]]] = {}
        # This gateway's own devices: id → (record, models) as last written.
        self._records: dict[str, tuple[bytes, frozenset[str]]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._started = time.time()
        self.peers_alive: set[str] = set()
        # Direct links to the other gateways, when this one has a link port.
        self.links: Links | None = None
        if settings.cluster_link_port:
            self.links = Links(
                self.gateway_id,
                secret=settings.cluster_secret,
                port=settings.cluster_link_port,
                bind=settings.cluster_link_bind,
                host=settings.cluster_link_host,
                # A job frame carries the request's messages, JSON-escaped again.
                max_frame_bytes=8 * settings.max_body_bytes + 1_048_576,
                on_message=self.handle,
                on_lost=self._link_lost,
            )

    # -- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        """Joins the network: liveness first, then the subscriptions, then a full sync."""
        if self.links is not None:
            await self.links.start()  # its address goes with the liveness key
        try:
            await self._beat()
        except (RedisError, OSError) as exc:
            raise RuntimeError(
                f"Redis at SWARMGATE_REDIS_URL is unreachable ({type(exc).__name__}: {exc}); "
                "a scaled-out gateway cannot start without it"
            ) from exc
        self._pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        await self._pubsub.subscribe(self._inbox, self.keys.presence.encode())
        self._tasks = [
            asyncio.create_task(self._publish_loop(), name="cluster-publish"),
            asyncio.create_task(self._listen_loop(), name="cluster-listen"),
            asyncio.create_task(self._liveness_loop(), name="cluster-liveness"),
        ]
        await self.sync()
        log.info("joined the gateway network", extra={"gateway_id": self.gateway_id})

    async def stop(self) -> None:
        """Leaves the network: this gateway's devices and liveness are removed at once, so
        peers need not wait for the TTL."""
        for device in self._registry.devices():
            if device.local:
                self.device_left(device)
        await self._flush()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(RedisError, OSError):
            await self._flush()
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.delete(self.keys.gateway(self.gateway_id))
                pipe.srem(self.keys.gateways, self.gateway_id)
                pipe.delete(self.keys.gateway_devices(self.gateway_id))
                await pipe.execute()
        with contextlib.suppress(Exception):
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]
        if self._publisher is not None:
            with contextlib.suppress(Exception):
                await self._publisher.disconnect()
        for task in list(self._background):
            task.cancel()
        if self.links is not None:
            await self.links.stop()
        await self.redis.aclose()

    @property
    def _liveness(self) -> str:
        """The liveness key's value: start time, and the link address if there is one."""
        address = self.links.address if self.links is not None else ""
        return f"alive {self._started} {address}".rstrip()

    def _link_lost(self, link: Link) -> None:
        """A link broke (or its peer died): what crossed it cannot finish. Attempts this
        gateway runs on the peer's devices fail over; relays whose jobs came over it stop."""
        for relay in [r for r in self._relays.values() if r.via is link]:
            with contextlib.suppress(DeviceGone):
                relay.device.send(
                    orjson.dumps({"type": "cancel", "job_id": relay.attempt_id}).decode()
                )
            self.end_relay(relay)
        for device_id in self._peers.get(link.peer, set()):
            device = self._registry.get(device_id)
            if isinstance(device, RemoteDevice) and device.holder == link.peer:
                for channel in list(device.active.values()):
                    channel.put_nowait(DeviceLost("the link to its gateway broke"))

    async def ping(self) -> bool:
        try:
            return bool(await self.redis.ping())
        except (RedisError, OSError):
            return False

    # -- sending --------------------------------------------------------------------------
    def _send(self, channel: bytes, data: bytes) -> None:
        self._outbox.append((channel, data))
        self._wake.set()

    def _command(self, add: Callable[[Any], object]) -> None:
        self._commands.append(add)
        self._wake.set()

    async def _publish_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._flush()
            except (RedisError, OSError):
                log.warning("publishing to Redis failed; retrying", exc_info=True)
                await asyncio.sleep(0.2)
                self._wake.set()

    async def _flush(self) -> None:
        while self._outbox or self._commands:
            if self._commands:
                async with self.redis.pipeline(transaction=False) as pipe:
                    while self._commands:
                        self._commands.popleft()(pipe)
                    await pipe.execute()
            if self._outbox:
                outbox = self._outbox
                batch = [outbox.popleft() for _ in range(min(len(outbox), 1000))]
                await self._publish(batch)

    async def _publish(self, batch: list[tuple[bytes, bytes]]) -> None:
        """PUBLISHes ``batch`` in order on this gateway's own connection: one write, then
        the replies (no pipeline object or pool checkout per batch on the hot path)."""
        conn = self._publisher
        if conn is None:
            conn = self._publisher = self.redis.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        try:
            packed = conn.pack_commands([(b"PUBLISH", channel, data) for channel, data in batch])
            await conn.send_packed_command(packed, check_health=False)
            for _ in batch:
                await conn.read_response()
        except BaseException:
            self._publisher = None
            with contextlib.suppress(Exception):
                await conn.disconnect()
            raise

    def to_holder(self, device: RemoteDevice, frame: str) -> None:
        """A frame for a remote device (a job or a cancel), to the gateway that holds it:
        over the link to it if there is one, else through Redis."""
        data = b"D|" + self._me + b"|" + device.device_id.encode() + b"|" + frame.encode()
        link = self.links.get(device.holder) if self.links is not None else None
        if link is None or not link.send(data):
            self._send(self.keys.inbox(device.holder).encode(), data)

    def publish_frame(self, origin: str, device_id: str, frame: str, via: Link | None) -> None:
        self._reply(
            origin, b"F|" + self._me + b"|" + device_id.encode() + b"|" + frame.encode(), via
        )

    def lost(
        self, origin: str, device_id: str, attempt_id: str, reason: str, via: Link | None
    ) -> None:
        self._reply(
            origin,
            b"L|"
            + self._me
            + b"|"
            + device_id.encode()
            + b"|"
            + f"{attempt_id}\n{reason}".encode(),
            via,
        )

    def _reply(self, origin: str, data: bytes, via: Link | None) -> None:
        """A frame back to the gateway running an attempt, the way its job came. A link
        that broke in between ends the attempt there (``_link_lost``)."""
        if via is None:
            self._send(self.keys.inbox(origin).encode(), data)
        else:
            via.send(data)

    # -- receiving ------------------------------------------------------------------------
    async def _listen_loop(self) -> None:
        while True:
            try:
                message = await self._pubsub.get_message(timeout=None)
            except (RedisError, OSError):
                log.warning("the Redis subscription failed; reconnecting", exc_info=True)
                await asyncio.sleep(0.5)
                continue
            if message is None or message.get("type") != "message":
                continue
            try:
                self.handle(message["data"])
            except Exception:
                log.exception("a message from another gateway could not be handled")

    def handle(self, data: bytes, via: Link | None = None) -> None:
        """A message from another gateway, through Redis or over ``via``, a link."""
        kind, gateway, device_id, payload = data.split(b"|", 3)
        peer = gateway.decode()
        if kind == b"F":
            self._on_device_frame(device_id.decode(), payload)
        elif kind == b"D":
            self._on_frame_for_device(peer, device_id.decode(), payload, via)
        elif kind == b"L":
            attempt_id, _, reason = payload.decode().partition("\n")
            device = self._registry.get(device_id.decode())
            channel = device.active.get(attempt_id) if device is not None else None
            if channel is not None:
                channel.put_nowait(DeviceLost(reason))
        elif peer != self.gateway_id:
            if kind == b"P":
                self._on_record(peer, device_id.decode(), orjson.loads(payload))
            elif kind == b"X":
                device = self._registry.get(device_id.decode())
                if isinstance(device, RemoteDevice) and device.holder == peer:
                    self._drop(device, "the device left its gateway")

    def _on_device_frame(self, device_id: str, payload: bytes) -> None:
        """A frame from a remote device, for an attempt this gateway runs."""
        device = self._registry.get(device_id)
        if device is None or device.local:
            return
        try:
            frame = node_frame_adapter.validate_json(payload)
        except ValidationError:
            log.warning("a bad frame came from another gateway", extra={"device_id": device_id})
            return
        if isinstance(frame, Delta | Done | JobError):
            channel = device.active.get(frame.job_id)
            if channel is not None:
                channel.put_nowait(frame)

    def _on_frame_for_device(
        self, origin: str, device_id: str, payload: bytes, via: Link | None
    ) -> None:
        """A job or a cancel that another gateway sends to a device connected here."""
        frame = orjson.loads(payload)
        attempt_id = str(frame.get("job_id", ""))
        if frame.get("type") == "cancel":
            relay = self._relays.pop(attempt_id, None)
            if relay is not None:
                with contextlib.suppress(DeviceGone):
                    relay.device.send(payload.decode())
                self.end_relay(relay)
            return
        device = self._registry.get(device_id)
        if device is None or not device.local or device.state is ConnectionState.CLOSED:
            self.lost(origin, device_id, attempt_id, "the device is no longer connected", via)
            return
        if not device.accepting or attempt_id in device.active:
            refusal = JobError(
                type="error",
                job_id=attempt_id,
                code="NODE_BUSY",
                message="the device has no free slot",
            )
            self.publish_frame(origin, device_id, refusal.model_dump_json(), via)
            return
        relay = _Relay(self, origin, device, attempt_id, via)
        device.occupy(attempt_id, relay)
        self._relays[attempt_id] = relay
        try:
            device.send(payload.decode())
        except DeviceGone:
            self.end_relay(relay)
            self.lost(origin, device_id, attempt_id, "the device is no longer connected", via)

    def end_relay(self, relay: _Relay) -> None:
        if self._relays.get(relay.attempt_id) is relay:
            del self._relays[relay.attempt_id]
        if relay.device.vacate(relay.attempt_id):
            self._registry.slot_freed(relay.device)

    # -- presence of this gateway's devices ---------------------------------------------------
    def _record(self, device: DeviceConnection) -> bytes:
        return orjson.dumps(
            {
                "gateway": self.gateway_id,
                "account_id": device.account_id,
                "region": device.region,
                "slots": device.slots,
                "models": sorted(device.models),
                "contexts": device.contexts,
                "engine": device.profile.engine,
                "node_version": device.node_version,
                "paused": device.state is ConnectionState.PAUSED,
                "pause_reason": device.pause_reason,
                "warming": sorted(device.warming),
            }
        )

    def device_changed(self, device: DeviceConnection) -> None:
        """A device connected here joined or changed (models, pause, warming): write its
        record and tell the peers."""
        if device.state is ConnectionState.CLOSED:
            return
        record = self._record(device)
        previous = self._records.get(device.device_id)
        if previous is not None and previous[0] == record:
            return
        models = frozenset(device.models)
        self._records[device.device_id] = (record, models)
        keys, ttl = self.keys, int(self.settings.cluster_device_ttl_s)
        device_id = device.device_id
        gone = previous[1] - models if previous is not None else frozenset()

        def write(pipe: Any) -> None:
            pipe.set(keys.device(device_id), record, ex=ttl)
            pipe.sadd(keys.gateway_devices(self.gateway_id), device_id)
            pipe.expire(keys.gateway_devices(self.gateway_id), ttl)
            for model in models:
                pipe.sadd(keys.model(model), device_id)
            for model in gone:
                pipe.srem(keys.model(model), device_id)

        self._command(write)
        self._send(
            self.keys.presence.encode(),
            b"P|" + self._me + b"|" + device_id.encode() + b"|" + record,
        )

    def device_left(self, device: DeviceConnection) -> None:
        """A device connected here went away: remove its record and tell the peers."""
        if self._records.pop(device.device_id, None) is None:
            return
        for relay in [r for r in self._relays.values() if r.device is device]:
            self.lost(
                relay.origin,
                device.device_id,
                relay.attempt_id,
                "the device disconnected",
                relay.via,
            )
            self.end_relay(relay)
        device_id = device.device_id
        self._command(lambda pipe: self._forget_in(pipe, self.gateway_id, device_id))
        self._send(self.keys.presence.encode(), b"X|" + self._me + b"|" + device_id.encode() + b"|")

    def _forget_in(self, pipe: Any, gateway: str, device_id: str) -> None:
        pipe.eval(
            _FORGET,
            2,
            self.keys.device(device_id),
            self.keys.gateway_devices(gateway),
            gateway,
            device_id,
            self.keys.model(""),
        )

    # -- peers' devices ---------------------------------------------------------------------
    def _on_record(self, holder: str, device_id: str, record: dict[str, Any]) -> None:
        current = self._registry.get(device_id)
        if current is not None and current.local and current.state is not ConnectionState.CLOSED:
            return  # connected here: a record elsewhere is stale
        if isinstance(current, RemoteDevice) and current.holder == holder:
            self._update(current, record)
            return
        if device_id in self._joining:
            self._joining[device_id] = (holder, record)
            return
        self._joining[device_id] = (holder, record)
        task = asyncio.get_running_loop().create_task(self._join(device_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _join(self, device_id: str) -> None:
        holder, record = self._joining[device_id]
        try:
            profile = await self._profile_for(
                device_id, str(record["account_id"]), str(record.get("engine", "unknown"))
            )
        except Exception:
            self._joining.pop(device_id, None)
            log.exception(
                "loading a remote device's profile failed", extra={"device_id": device_id}
            )
            return
        holder, record = self._joining.pop(device_id)
        if holder not in self.peers_alive and holder != self.gateway_id:
            if not await self._alive(holder):
                return
            self.peers_alive.add(holder)
        current = self._registry.get(device_id)
        if current is not None and current.local and current.state is not ConnectionState.CLOSED:
            return
        models = frozenset(str(m) for m in record.get("models", ()))
        device = RemoteDevice(
            device_id=device_id,
            account_id=str(record["account_id"]),
            region=str(record.get("region", "unknown")),
            slots=int(record.get("slots", 1)),
            models=models,
            send_text=_no_socket,
            node_version=str(record.get("node_version", "")),
            profile=profile,
            contexts={str(k): int(v) for k, v in dict(record.get("contexts") or {}).items()},
            holder=holder,
            mesh=self,
        )
        device.transition(ConnectionState.READY)
        replaced = self._registry.add(device)
        if replaced is not None and replaced is not device:
            replaced.close("the device moved to another gateway")
            if isinstance(replaced, RemoteDevice):
                self._peers.get(replaced.holder, set()).discard(device_id)
        self._peers.setdefault(holder, set()).add(device_id)
        self._update(device, record)

    def _update(self, device: RemoteDevice, record: dict[str, Any]) -> None:
        device.last_seen = time.monotonic()
        models = frozenset(str(m) for m in record.get("models", ()))
        contexts = {str(k): int(v) for k, v in dict(record.get("contexts") or {}).items()}
        slots = int(record.get("slots", device.slots))
        if slots != device.slots:
            device.slots = slots
            device.reindex()
        if models != device.models or contexts != device.contexts:
            self._registry.update_models(device, models, contexts)
        warming = frozenset(str(m) for m in record.get("warming", ()))
        if warming != device.warming:
            self._registry.set_warming(device, warming)
        reason = record.get("pause_reason")
        self._registry.set_paused(device, bool(record.get("paused")), reason and str(reason))

    def _drop(self, device: RemoteDevice, reason: str) -> None:
        """A remote device is gone: its running attempts fail over."""
        self._peers.get(device.holder, set()).discard(device.device_id)
        device.close(reason)
        self._registry.remove(device)

    # -- liveness and sync ------------------------------------------------------------------
    async def _beat(self) -> None:
        ttl_ms = int(self.settings.cluster_gateway_ttl_s * 1000)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(self.keys.gateway(self.gateway_id), self._liveness, px=ttl_ms)
            pipe.sadd(self.keys.gateways, self.gateway_id)
            await pipe.execute()

    async def _alive(self, gateway: str) -> bool:
        return bool(await self.redis.exists(self.keys.gateway(gateway)))

    async def _liveness_loop(self) -> None:
        interval = self.settings.cluster_liveness_interval_s
        sync_every = max(1, round(self.settings.cluster_sync_interval_s / interval))
        refresh_every = max(1, round(self.settings.cluster_device_ttl_s / 3 / interval))
        tick = 0
        while True:
            await asyncio.sleep(interval)
            tick += 1
            try:
                await self._beat()
                await self.check_peers()
                if tick % refresh_every == 0:
                    self._refresh_records()
                if tick % sync_every == 0:
                    await self.sync()
            except (RedisError, OSError):
                log.warning("the gateway network could not be reached", exc_info=True)
            except Exception:
                log.exception("keeping up with the gateway network failed")

    def _refresh_records(self) -> None:
        keys, ttl = self.keys, int(self.settings.cluster_device_ttl_s)
        records = list(self._records.items())

        def refresh(pipe: Any) -> None:
            for device_id, (record, _models) in records:
                pipe.set(keys.device(device_id), record, ex=ttl)
            pipe.sadd(keys.gateway_devices(self.gateway_id), *[d for d, _ in records] or ["-"])
            pipe.srem(keys.gateway_devices(self.gateway_id), "-")
            pipe.expire(keys.gateway_devices(self.gateway_id), ttl)

        self._command(refresh)

    async def check_peers(self) -> set[str]:
        """Finds dead peers and lets their devices and relays go; returns the live ones."""
        members = [_text(m) for m in await self.redis.smembers(self.keys.gateways)]
        others = [g for g in members if g != self.gateway_id]
        known = set(self._peers) | {r.origin for r in self._relays.values()}
        candidates = sorted(set(others) | known)
        if not candidates:
            self.peers_alive = set()
            return set()
        flags = await self.redis.mget([self.keys.gateway(g) for g in candidates])
        alive = {g for g, flag in zip(candidates, flags, strict=True) if flag is not None}
        for gateway in candidates:
            if gateway not in alive:
                await self._peer_died(gateway)
        self.peers_alive = alive
        if self.links is not None:
            self.links.keep_up(
                {g: _link_address(flag) for g, flag in zip(candidates, flags, strict=True) if flag}
            )
        return alive

    async def _peer_died(self, gateway: str) -> None:
        if self.links is not None:
            self.links.drop(gateway)
        held = self._peers.pop(gateway, set())
        if held or any(r.origin == gateway for r in self._relays.values()):
            log.warning(
                "a gateway stopped answering; its devices and requests are dropped",
                extra={"gateway_id": gateway, "devices": len(held)},
            )
        for device_id in held:
            device = self._registry.get(device_id)
            if isinstance(device, RemoteDevice) and device.holder == gateway:
                device.close("its gateway stopped answering")
                self._registry.remove(device)
        for relay in [r for r in self._relays.values() if r.origin == gateway]:
            with contextlib.suppress(DeviceGone):
                relay.device.send(
                    orjson.dumps({"type": "cancel", "job_id": relay.attempt_id}).decode()
                )
            self.end_relay(relay)
        # Whoever notices first tidies Redis; doing it twice is harmless.
        ids = [_text(m) for m in await self.redis.smembers(self.keys.gateway_devices(gateway))]
        async with self.redis.pipeline(transaction=False) as pipe:
            for device_id in ids:
                self._forget_in(pipe, gateway, device_id)
            pipe.delete(self.keys.gateway_devices(gateway))
            pipe.srem(self.keys.gateways, gateway)
            await pipe.execute()

    async def sync(self) -> None:
        """Reads every live peer's device set: joins what was missed, drops what is gone
        (presence messages are not stored, so this repairs any that were lost)."""
        alive = await self.check_peers()
        for gateway in sorted(alive):
            members = await self.redis.smembers(self.keys.gateway_devices(gateway))
            ids = {_text(m) for m in members}
            held = self._peers.get(gateway, set())
            for device_id in list(held - ids):
                device = self._registry.get(device_id)
                if isinstance(device, RemoteDevice) and device.holder == gateway:
                    self._drop(device, "the device left its gateway")
            missing = sorted(ids - held)
            if not missing:
                continue
            records = await self.redis.mget([self.keys.device(d) for d in missing])
            for device_id, raw in zip(missing, records, strict=True):
                if raw is None:
                    continue
                record = orjson.loads(raw)
                if record.get("gateway") == gateway:
                    self._on_record(gateway, device_id, record)

    async def devices_for(self, model: str) -> set[str]:
        """Ids of the devices serving ``model`` anywhere in the network (the index by
        model), without members whose record has expired."""
        ids = sorted(_text(m) for m in await self.redis.smembers(self.keys.model(model)))
        if not ids:
            return set()
        records = await self.redis.mget([self.keys.device(d) for d in ids])
        stale = [d for d, raw in zip(ids, records, strict=True) if raw is None]
        if stale:
            await self.redis.srem(self.keys.model(model), *stale)
        return {d for d, raw in zip(ids, records, strict=True) if raw is not None}

    async def settle_background(self) -> None:
        """Waits for profile loads under way (tests)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)


def _link_address(liveness: bytes | str) -> str:
    """The link address a liveness value advertises ("" if none)."""
    parts = _text(liveness).split(" ")
    return parts[2] if len(parts) > 2 else ""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def _no_socket(_text: str) -> None:
    raise DeviceGone("a remote device has no socket here")
