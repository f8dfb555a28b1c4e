"""API keys and device tokens: made from 192 random bits, stored only as SHA-256 digests.

A key is ``sg_live_<32 url-safe chars>`` or ``sg_test_<…>``; a device token is
``sg_dev_<…>``. The database holds the hex digest and a short display prefix. A
lookup hashes the presented key, finds the row by digest and compares digests with
``hmac.compare_digest``. Verified keys are cached in memory for a short TTL so the
request path does no database IO for a key it has seen recently.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from swarmgate.errors import AuthError
from swarmgate.store.db import as_utc
from swarmgate.store.tables import api_keys, devices

KeyMode = Literal["live", "test"]
LIVE_PREFIX = "sg_live_"
TEST_PREFIX = "sg_test_"
DEVICE_PREFIX = "sg_dev_"
_RANDOM_BYTES = 24  # 192 bits


def new_secret(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(_RANDOM_BYTES)


def digest_of(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def display_prefix(secret: str) -> str:
    return secret[: secret.index("_", 3) + 5]


def new_id(kind: str) -> str:
    return f"{kind}_{secrets.token_hex(8)}"


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class KeySettings:
    """A key's limits and defaults; None means no limit (or every model)."""

    rpm_limit: int | None = None
    tpm_limit: int | None = None
    daily_spend_cap_micros: int | None = None
    allowed_models: frozenset[str] | None = None
    auto_memory: bool = False
    auto_orchestration: bool = False

    def allows(self, model_id: str) -> bool:
        return self.allowed_models is None or model_id in self.allowed_models


NO_LIMITS = KeySettings()


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the account, the key it used (None for a session or a JWT) and
    that key's settings. ``mode`` "test" means sandbox money only."""

    account_id: str
    key_id: str | None
    mode: KeyMode
    settings: KeySettings = NO_LIMITS

    @property
    def sandbox(self) -> bool:
        return self.mode == "test"


@dataclass(frozen=True, slots=True)
class DevicePrincipal:
    device_id: str
    account_id: str
    name: str


def key_settings(row: Any) -> KeySettings:
    """A key's settings from its ``api_keys`` row."""
    allowed = row.allowed_models
    return KeySettings(
        rpm_limit=row.rpm_limit,
        tpm_limit=row.tpm_limit,
        daily_spend_cap_micros=row.daily_spend_cap_micros,
        allowed_models=None if allowed is None else frozenset(orjson.loads(allowed)),
        auto_memory=bool(row.auto_memory),
        auto_orchestration=bool(row.auto_orchestration),
    )


def parse_bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() != "bearer" or not credentials:
        return None
    return credentials.strip()


class KeyVerifier:
    """Verifies API keys, with a bounded in-memory cache of recent answers."""

    def __init__(self, engine: AsyncEngine, ttl_s: float = 30.0, max_entries: int = 100_000):
        self._engine = engine
        self._ttl = ttl_s
        self._max = max_entries
        self._cache: OrderedDict[str, tuple[float, Principal | None]] = OrderedDict()
        self._used: dict[str, datetime] = {}
        self._digests: dict[str, str] = {}  # key id → digest, to forget a key by id

    async def verify(self, secret: str | None) -> Principal:
        if not secret or not secret.startswith((LIVE_PREFIX, TEST_PREFIX)) or len(secret) > 128:
            raise AuthError("Missing or invalid API key. Pass 'Authorization: Bearer sg_live_…'.")
        digest = digest_of(secret)
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            principal = cached[1]
        else:
            principal, valid_for_s = await self._load(digest)
            # Unknown keys are cached too (briefly), so a flood of bad keys stays off the DB;
            # a key that expires soon is cached only until it expires.
            ttl = min(self._ttl, valid_for_s) if principal is not None else min(self._ttl, 5.0)
            self._cache[digest] = (now + ttl, principal)
            self._cache.move_to_end(digest)
            while len(self._cache) > self._max:
                self._cache.popitem(last=False)
        if principal is None:
            raise AuthError("Missing or invalid API key. Pass 'Authorization: Bearer sg_live_…'.")
        if principal.key_id is not None:
            self._used[principal.key_id] = utcnow()
        return principal

    async def _load(self, digest: str) -> tuple[Principal | None, float]:
        """The key's principal (None if unusable) and the seconds it stays valid."""
        query = select(
            api_keys.c.id,
            api_keys.c.account_id,
            api_keys.c.mode,
            api_keys.c.digest,
            api_keys.c.expires_at,
            api_keys.c.revoked_at,
            api_keys.c.rpm_limit,
            api_keys.c.tpm_limit,
            api_keys.c.daily_spend_cap_micros,
            api_keys.c.allowed_models,
            api_keys.c.auto_memory,
            api_keys.c.auto_orchestration,
        ).where(api_keys.c.digest == digest)
        async with self._engine.connect() as conn:
            row = (await conn.execute(query)).first()
        if row is None or not hmac.compare_digest(row.digest, digest):
            return None, 0.0
        if row.revoked_at is not None:
            return None, 0.0
        valid_for_s = float("inf")
        if row.expires_at is not None:
            valid_for_s = (as_utc(row.expires_at) - utcnow()).total_seconds()
            if valid_for_s <= 0:
                return None, 0.0
        self._digests[row.id] = digest
        principal = Principal(
            account_id=row.account_id, key_id=row.id, mode=row.mode, settings=key_settings(row)
        )
        return principal, valid_for_s

    def forget(self, digest: str) -> None:
        self._cache.pop(digest, None)

    def forget_key(self, key_id: str) -> None:
        """Drops a key from the cache at once (revoked, rotated or its settings changed)."""
        digest = self._digests.pop(key_id, None)
        if digest is not None:
            self._cache.pop(digest, None)

    async def flush_last_used(self) -> None:
        """Write 'last used' times in one batch; called periodically, off the request path."""
        if not self._used:
            return
        used, self._used = self._used, {}
        async with self._engine.begin() as conn:
            for key_id, when in used.items():
                await conn.execute(
                    update(api_keys).where(api_keys.c.id == key_id).values(last_used_at=when)
                )


async def verify_device_token(engine: AsyncEngine, secret: str | None) -> DevicePrincipal | None:
    if not secret or not secret.startswith(DEVICE_PREFIX) or len(secret) > 128:
        return None
    digest = digest_of(secret)
    query = select(
        devices.c.id,
        devices.c.account_id,
        devices.c.name,
        devices.c.token_digest,
        devices.c.revoked_at,
    ).where(devices.c.token_digest == digest)
    async with engine.connect() as conn:
        row = (await conn.execute(query)).first()
    if row is None or row.revoked_at is not None:
        return None
    if not hmac.compare_digest(row.token_digest, digest):
        return None
    return DevicePrincipal(device_id=row.id, account_id=row.account_id, name=row.name)
