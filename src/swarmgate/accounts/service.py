"""Creating and listing accounts, API keys and device tokens (admin operations)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from swarmgate.accounts.keys import (
    DEVICE_PREFIX,
    LIVE_PREFIX,
    TEST_PREFIX,
    KeyMode,
    digest_of,
    display_prefix,
    new_id,
    new_secret,
    utcnow,
)
from swarmgate.billing.ledger import WELCOME_SOURCE, post_top_up
from swarmgate.errors import NotFound, RequestError
from swarmgate.store.db import iso
from swarmgate.store.tables import accounts, api_keys, devices


@dataclass(frozen=True)
class CreatedSecret:
    """A key or token as created: the secret is shown once and never stored."""

    id: str
    account_id: str
    secret: str
    prefix: str
    created_at: datetime


async def create_account(
    engine: AsyncEngine,
    *,
    name: str,
    email: str | None = None,
    credit_micros: int = 0,
    developer: bool = True,
    provider: bool = False,
) -> dict[str, Any]:
    if credit_micros < 0:
        raise RequestError("credits cannot be negative", param="credits")
    account_id = new_id("acct")
    now = utcnow()
    try:
        async with engine.begin() as conn:
            await conn.execute(
                insert(accounts).values(
                    id=account_id,
                    name=name,
                    email=email,
                    is_developer=developer,
                    is_provider=provider,
                    # Kept as a record of the grant; the balance itself lives in the ledger.
                    initial_credit_micros=credit_micros,
                    created_at=now,
                )
            )
            if credit_micros > 0:
                # Same database transaction as the account: it never exists without its credit.
                await post_top_up(
                    conn,
                    account_id=account_id,
                    amount_micros=credit_micros,
                    source=WELCOME_SOURCE,
                    external_id=account_id,
                    memo="welcome credit",
                    now=now,
                )
    except IntegrityError as exc:
        raise RequestError(f"an account with email {email!r} exists", param="email") from exc
    return {
        "id": account_id,
        "name": name,
        "email": email,
        "developer": developer,
        "provider": provider,
        "credit_micros": credit_micros,
        "created_at": now.isoformat(),
    }


async def _require_account(engine: AsyncEngine, account_id: str) -> None:
    async with engine.connect() as conn:
        found = await conn.scalar(select(accounts.c.id).where(accounts.c.id == account_id))
    if found is None:
        raise NotFound(f"no account {account_id!r}", param="account")


async def create_api_key(
    engine: AsyncEngine,
    *,
    account_id: str,
    name: str = "",
    mode: KeyMode = "live",
    expires_at: datetime | None = None,
) -> CreatedSecret:
    await _require_account(engine, account_id)
    secret = new_secret(LIVE_PREFIX if mode == "live" else TEST_PREFIX)
    key_id = new_id("key")
    now = utcnow()
    async with engine.begin() as conn:
        await conn.execute(
            insert(api_keys).values(
                id=key_id,
                account_id=account_id,
                digest=digest_of(secret),
                prefix=display_prefix(secret),
                name=name,
                mode=mode,
                created_at=now,
                expires_at=expires_at,
            )
        )
    return CreatedSecret(key_id, account_id, secret, display_prefix(secret), now)


async def create_device(engine: AsyncEngine, *, account_id: str, name: str = "") -> CreatedSecret:
    """Registers a device for a provider account and returns its token (shown once)."""
    await _require_account(engine, account_id)
    secret = new_secret(DEVICE_PREFIX)
    device_id = new_id("dev")
    now = utcnow()
    async with engine.begin() as conn:
        await conn.execute(
            insert(devices).values(
                id=device_id,
                account_id=account_id,
                token_digest=digest_of(secret),
                token_prefix=display_prefix(secret),
                name=name,
                created_at=now,
            )
        )
        await conn.execute(
            accounts.update().where(accounts.c.id == account_id).values(is_provider=True)
        )
    return CreatedSecret(device_id, account_id, secret, display_prefix(secret), now)


async def list_accounts(engine: AsyncEngine) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        rows = (await conn.execute(select(accounts).order_by(accounts.c.created_at))).all()
    return [
        {
            "id": r.id,
            "name": r.name,
            "email": r.email,
            "developer": r.is_developer,
            "provider": r.is_provider,
            "credit_micros": r.initial_credit_micros,
            "created_at": iso(r.created_at),
        }
        for r in rows
    ]


async def list_devices(engine: AsyncEngine) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        rows = (await conn.execute(select(devices).order_by(devices.c.created_at))).all()
    return [
        {
            "id": r.id,
            "account_id": r.account_id,
            "name": r.name,
            "token_prefix": r.token_prefix,
            "os": r.os,
            "cpu": r.cpu,
            "ram_mb": r.ram_mb,
            "accelerator": r.accelerator,
            "region": r.region,
            "node_version": r.node_version,
            "created_at": iso(r.created_at),
            "last_seen_at": iso(r.last_seen_at),
        }
        for r in rows
    ]


async def count_accounts(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(accounts)) or 0)
