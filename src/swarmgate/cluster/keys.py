"""Every Redis key and channel the gateways use, with its lifetime: the one place to read
what a network keeps in Redis.

All names start with the configured prefix (``SWARMGATE_REDIS_PREFIX``, ``sg:``), so two
networks, or a test run, can share one Redis.

=================================  =======  ===============================================
key                                type     what it holds; how long
=================================  =======  ===============================================
``{p}gateways``                    set      ids of gateways that joined; a member whose
                                            liveness key is gone is dead and is removed by
                                            whichever peer notices first
``{p}gw:{gateway}``                string   a gateway's liveness ("alive", start time, and
                                            its link address ``host:port`` when it has
                                            one, space-separated);
                                            TTL ``cluster_gateway_ttl_s`` (5 s), refreshed
                                            every ``cluster_liveness_interval_s`` (1 s)
``{p}gw:{gateway}:devices``        set      ids of the devices connected to that gateway;
                                            TTL ``cluster_device_ttl_s``, refreshed with them
``{p}dev:{device}``                string   a connected device's presence record (JSON:
                                            gateway, account, models, slots, state); TTL
                                            ``cluster_device_ttl_s`` (60 s), refreshed
                                            every third of it while the device is connected
``{p}model:{model}``               set      ids of devices serving a model (the index by
                                            model); stale members are removed on read and
                                            when their gateway is found dead
``{p}rl:{key id}:req`` / ``:tok``  hash     a key's request and token buckets (tokens,
                                            updated); TTL two minutes after the last use
``{p}idem:{account}:{key}``        hash     an Idempotency-Key's claim and stored response;
                                            TTL ``idempotency_ttl_s`` (24 h)
``{p}wal:{{account}:{book}}``      hash     a developer book's credit (``bal``, ``held``;
                                            ``cluster/wallets.py``; book ``live`` or
                                            ``sandbox``; the outer braces are a Redis
                                            hash tag); TTL a day after the last use
``{p}wal:{{account}:{book}}:e``    hash     its open entries (reservations, markers):
                                            entry id -> micro-dollars; same TTL
``{p}wal:{{account}:{book}}:x``    zset     the entries' expiry (ms, Redis clock); an
                                            entry lives ``cluster_reservation_lease_s``
``{p}wal:{{account}:{book}}:g``    string   the wallet's generation, bumped by every
                                            change; same TTL
=================================  =======  ===============================================

Channels (pub/sub, nothing stored):

``{p}presence``           device joins, changes and leaves, for every gateway
``{p}inbox:{gateway}``    frames for one gateway: jobs and cancels for its devices, and
                          the frames of attempts it asked another gateway to run
"""

from __future__ import annotations

from dataclasses import dataclass

# Rate-limit buckets refill completely within a minute; two minutes unused and they are
# full again, so the key may go.
RATE_BUCKET_TTL_S = 120
# A developer's wallet unused for a day leaves Redis; the next request loads it again.
WALLET_IDLE_TTL_S = 86_400


@dataclass(frozen=True, slots=True)
class ClusterKeys:
    prefix: str = "sg:"

    @property
    def gateways(self) -> str:
        return f"{self.prefix}gateways"

    def gateway(self, gateway_id: str) -> str:
        return f"{self.prefix}gw:{gateway_id}"

    def gateway_devices(self, gateway_id: str) -> str:
        return f"{self.prefix}gw:{gateway_id}:devices"

    def device(self, device_id: str) -> str:
        return f"{self.prefix}dev:{device_id}"

    def model(self, model: str) -> str:
        return f"{self.prefix}model:{model}"

    def rate(self, key_id: str, kind: str) -> str:
        return f"{self.prefix}rl:{key_id}:{kind}"

    def idempotency(self, account_id: str, key: str) -> str:
        return f"{self.prefix}idem:{account_id}:{key}"

    def wallet(self, account_id: str, sandbox: bool) -> list[str]:
        """A developer book's wallet keys: balance, entries, expiry, generation. One hash
        tag, so a Redis Cluster keeps them in one slot (the scripts touch all four)."""
        base = f"{self.prefix}wal:{{{account_id}:{'sandbox' if sandbox else 'live'}}}"
        return [base, f"{base}:e", f"{base}:x", f"{base}:g"]

    @property
    def presence(self) -> str:
        return f"{self.prefix}presence"

    def inbox(self, gateway_id: str) -> str:
        return f"{self.prefix}inbox:{gateway_id}"
