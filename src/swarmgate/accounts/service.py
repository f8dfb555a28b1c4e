"""Accounts, API keys and device tokens: creating, listing and changing them.

The admin API and CLI, sign-up, JWT sign-in and the self-service ``/v1/keys`` API all
go through here. Each function that writes is one database transaction, so an account
never exists without its welcome credit and a rotated key never leaves both keys live
without the old one's revocation being recorded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import Row, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from swarmgate.accounts.keys import (
    DEVICE_PREFIX,
    LIVE_PREFIX,
    NO_LIMITS,
    TEST_PREFIX,
    KeyMode,
    KeySettings,
    digest_of,
    display_prefix,
    key_settings,
    new_id,
    new_secret,
    utcnow,
)
from swarmgate.billing.ledger import WELCOME_SOURCE, post_top_up
from swarmgate.billing.payouts import grant_provider_bonus
from swarmgate.errors import Conflict, NotFound, RequestError
from swarmgate.store.db import as_utc, iso, write_transaction
from swarmgate.store.tables import account_identities, accounts, api_keys, devices

# What a key's owner may change after creation; anything else is fixed for its lifetime.
KEY_SETTING_FIELDS = frozenset(
    {
        "name",
        "expires_at",
        "rpm_limit",
        "tpm_limit",
        "daily_spend_cap_micros",
        "allowed_models",
        "auto_memory",
        "auto_orchestration",
    }
)


@dataclass(frozen=True)
class CreatedSecret:
    """A key or token as created: the secret is shown once and never stored."""

    id: str
    account_id: str
    secret: str
    prefix: str
    created_at: datetime


# -- accounts ---------------------------------------------------------------------------
def account_roles(row: Any) -> list[str]:
    roles = []
    if row.is_developer:
        roles.append("developer")
    if row.is_provider:
        roles.append("provider")
    return roles


def describe_account(row: Any) -> dict[str, Any]:
    """An account as the public API shows it to its owner."""
    return {
        "id": row.id,
        "object": "account",
        "email": row.email,
        "name": row.name,
        "roles": account_roles(row),
        "created": int(as_utc(row.created_at).timestamp()),
    }


async def email_taken(conn: AsyncConnection, email: str) -> bool:
    found = await conn.scalar(select(accounts.c.id).where(accounts.c.email == email))
    return found is not None


async def insert_account(
    conn: AsyncConnection,
    *,
    name: str,
    email: str | None,
    now: datetime,
    credit_micros: int = 0,
    sandbox_credit_micros: int = 0,
    developer: bool = True,
    provider: bool = False,
    password_hash: str | None = None,
) -> str:
    """Writes an account and its welcome credit inside the caller's transaction."""
    if credit_micros < 0:
        raise RequestError("credits cannot be negative", param="credits")
    if sandbox_credit_micros < 0:
        raise RequestError("sandbox credits cannot be negative", param="sandbox_credits")
    account_id = new_id("acct")
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
            password_hash=password_hash,
        )
    )
    if credit_micros > 0:
        await post_top_up(
            conn,
            account_id=account_id,
            amount_micros=credit_micros,
            source=WELCOME_SOURCE,
            external_id=account_id,
            memo="welcome credit",
            now=now,
        )
    if sandbox_credit_micros > 0:
        await post_top_up(
            conn,
            account_id=account_id,
            amount_micros=sandbox_credit_micros,
            source=WELCOME_SOURCE,
            external_id=f"{account_id}:sandbox",
            sandbox=True,
            memo="sandbox play credit",
            now=now,
        )
    return account_id


def email_taken_error(email: str) -> Conflict:
    return Conflict(
        f"An account with the email {email!r} already exists.", param="email", code="EMAIL_TAKEN"
    )


async def raise_if_email_taken(engine: AsyncEngine, email: str | None, exc: Exception) -> None:
    """Turns a unique-constraint failure into a 409 when the email is what clashed."""
    if email is None:
        return
    async with engine.connect() as conn:
        taken = await email_taken(conn, email)
    if taken:
        raise email_taken_error(email) from exc


async def create_account(
    engine: AsyncEngine,
    *,
    name: str,
    email: str | None = None,
    credit_micros: int = 0,
    sandbox_credit_micros: int = 0,
    developer: bool = True,
    provider: bool = False,
    password_hash: str | None = None,
) -> dict[str, Any]:
    now = utcnow()
    try:
        async with engine.begin() as conn:
            # Same database transaction as the account: it never exists without its credit.
            account_id = await insert_account(
                conn,
                name=name,
                email=email,
                now=now,
                credit_micros=credit_micros,
                sandbox_credit_micros=sandbox_credit_micros,
                developer=developer,
                provider=provider,
                password_hash=password_hash,
            )
    except IntegrityError as exc:
        if email is not None:
            async with engine.connect() as conn:
                taken = await email_taken(conn, email)
            if taken:
                # The admin surface's long-standing answer; sign-up answers 409 EMAIL_TAKEN.
                raise RequestError(
                    f"an account with email {email!r} exists", param="email"
                ) from exc
        raise
    return {
        "id": account_id,
        "name": name,
        "email": email,
        "developer": developer,
        "provider": provider,
        "credit_micros": credit_micros,
        "created_at": now.isoformat(),
    }


async def get_account(engine: AsyncEngine, account_id: str) -> dict[str, Any]:
    async with engine.connect() as conn:
        row = (await conn.execute(select(accounts).where(accounts.c.id == account_id))).first()
    if row is None:
        raise NotFound(f"no account {account_id!r}", param="account")
    return describe_account(row)


async def _require_account(engine: AsyncEngine, account_id: str) -> None:
    async with engine.connect() as conn:
        found = await conn.scalar(select(accounts.c.id).where(accounts.c.id == account_id))
    if found is None:
        raise NotFound(f"no account {account_id!r}", param="account")


# -- identities: an outside issuer's subject signed in as one of our accounts ----------
async def account_for_identity(engine: AsyncEngine, issuer: str, subject: str) -> str | None:
    query = select(account_identities.c.account_id).where(
        account_identities.c.issuer == issuer, account_identities.c.subject == subject
    )
    async with engine.connect() as conn:
        found = await conn.scalar(query)
    return None if found is None else str(found)


async def create_identity_account(
    engine: AsyncEngine,
    *,
    issuer: str,
    subject: str,
    name: str,
    email: str | None,
    credit_micros: int = 0,
    sandbox_credit_micros: int = 0,
) -> str:
    """The account for an (issuer, subject) pair, created with its credit on first sight.

    Two first requests can race; the identity's primary key lets exactly one insert win,
    the loser's whole transaction (account and credit included) rolls back, and it reads
    the winner's mapping.
    """
    try:
        async with write_transaction(engine) as conn:
            existing = await conn.scalar(
                select(account_identities.c.account_id).where(
                    account_identities.c.issuer == issuer,
                    account_identities.c.subject == subject,
                )
            )
            if existing is not None:
                return str(existing)
            # An email already taken stays with its account: an outside issuer's claim
            # alone must not attach this identity to someone else's account.
            if email is not None and await email_taken(conn, email):
                email = None
            now = utcnow()
            account_id = await insert_account(
                conn,
                name=name,
                email=email,
                now=now,
                credit_micros=credit_micros,
                sandbox_credit_micros=sandbox_credit_micros,
            )
            await conn.execute(
                insert(account_identities).values(
                    issuer=issuer, subject=subject, account_id=account_id, created_at=now
                )
            )
            return account_id
    except IntegrityError:
        winner = await account_for_identity(engine, issuer, subject)
        if winner is not None:
            return winner
        if email is None:
            raise
    # The email was claimed between our check and our insert: create it without one.
    return await create_identity_account(
        engine,
        issuer=issuer,
        subject=subject,
        name=name,
        email=None,
        credit_micros=credit_micros,
        sandbox_credit_micros=sandbox_credit_micros,
    )


# -- API keys ---------------------------------------------------------------------------
def _allowed_models_json(models: frozenset[str] | list[str] | None) -> str | None:
    return None if models is None else orjson.dumps(sorted(set(models))).decode()


def key_setting_values(settings: KeySettings) -> dict[str, Any]:
    """A key's settings as ``api_keys`` column values."""
    return {
        "rpm_limit": settings.rpm_limit,
        "tpm_limit": settings.tpm_limit,
        "daily_spend_cap_micros": settings.daily_spend_cap_micros,
        "allowed_models": _allowed_models_json(settings.allowed_models),
        "auto_memory": settings.auto_memory,
        "auto_orchestration": settings.auto_orchestration,
    }


def usd_text(micros: int) -> str:
    return f"{micros // 1_000_000}.{micros % 1_000_000:06d}"


def describe_settings(settings: KeySettings) -> dict[str, Any]:
    cap = settings.daily_spend_cap_micros
    return {
        "rpm_limit": settings.rpm_limit,
        "tpm_limit": settings.tpm_limit,
        "daily_spend_cap_micros": cap,
        "daily_spend_cap_usd": None if cap is None else usd_text(cap),
        "allowed_models": (
            None if settings.allowed_models is None else sorted(settings.allowed_models)
        ),
        "auto_memory": settings.auto_memory,
        "auto_orchestration": settings.auto_orchestration,
    }


def key_status(row: Any, now: datetime) -> str:
    if row.revoked_at is not None:
        return "revoked"
    if row.expires_at is not None and as_utc(row.expires_at) <= now:
        return "expired"
    return "active"


def describe_key(row: Any, now: datetime | None = None) -> dict[str, Any]:
    """A key as its owner sees it: never the secret, never its digest."""
    return {
        "id": row.id,
        "object": "api_key",
        "name": row.name,
        "prefix": row.prefix,
        "mode": row.mode,
        "status": key_status(row, now or utcnow()),
        "created": int(as_utc(row.created_at).timestamp()),
        "last_used_at": iso(row.last_used_at),
        "expires_at": iso(row.expires_at),
        "revoked_at": iso(row.revoked_at),
        "settings": describe_settings(key_settings(row)),
    }


_KEY_COLUMNS = [c for c in api_keys.c if c.name != "digest"]


async def insert_api_key(
    conn: AsyncConnection,
    *,
    account_id: str,
    now: datetime,
    name: str = "",
    mode: KeyMode = "live",
    expires_at: datetime | None = None,
    settings: KeySettings = NO_LIMITS,
) -> CreatedSecret:
    secret = new_secret(LIVE_PREFIX if mode == "live" else TEST_PREFIX)
    key_id = new_id("key")
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
            **key_setting_values(settings),
        )
    )
    return CreatedSecret(key_id, account_id, secret, display_prefix(secret), now)


async def create_api_key(
    engine: AsyncEngine,
    *,
    account_id: str,
    name: str = "",
    mode: KeyMode = "live",
    expires_at: datetime | None = None,
    settings: KeySettings = NO_LIMITS,
) -> CreatedSecret:
    await _require_account(engine, account_id)
    async with engine.begin() as conn:
        return await insert_api_key(
            conn,
            account_id=account_id,
            now=utcnow(),
            name=name,
            mode=mode,
            expires_at=expires_at,
            settings=settings,
        )


async def _owned_key(conn: AsyncConnection, account_id: str, key_id: str) -> Row[Any]:
    # Another account's key is "not found", not "forbidden": its existence is not ours to tell.
    query = select(*_KEY_COLUMNS).where(
        api_keys.c.id == key_id, api_keys.c.account_id == account_id
    )
    row = (await conn.execute(query)).first()
    if row is None:
        raise NotFound(f"No API key {key_id!r} on this account.", param="key_id")
    return row


async def list_api_keys(engine: AsyncEngine, account_id: str) -> list[dict[str, Any]]:
    query = (
        select(*_KEY_COLUMNS)
        .where(api_keys.c.account_id == account_id)
        .order_by(api_keys.c.created_at, api_keys.c.id)
    )
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    now = utcnow()
    return [describe_key(row, now) for row in rows]


async def owned_key_description(
    conn: AsyncConnection, account_id: str, key_id: str
) -> dict[str, Any]:
    return describe_key(await _owned_key(conn, account_id, key_id))


async def get_api_key(engine: AsyncEngine, account_id: str, key_id: str) -> dict[str, Any]:
    async with engine.connect() as conn:
        return await owned_key_description(conn, account_id, key_id)


def _require_usable(row: Any, action: str) -> None:
    if row.revoked_at is not None:
        raise Conflict(
            f"API key {row.id!r} is revoked; it cannot be {action}.",
            param="key_id",
            code="KEY_REVOKED",
        )


async def update_api_key(
    engine: AsyncEngine, account_id: str, key_id: str, changes: Mapping[str, Any]
) -> dict[str, Any]:
    """Changes a key's name, expiry or settings; ``None`` clears a limit."""
    unknown = set(changes) - KEY_SETTING_FIELDS
    if unknown:
        raise ValueError(f"not a key setting: {sorted(unknown)}")
    values = dict(changes)
    if "allowed_models" in values:
        values["allowed_models"] = _allowed_models_json(values["allowed_models"])
    async with write_transaction(engine) as conn:
        _require_usable(await _owned_key(conn, account_id, key_id), "changed")
        if values:
            await conn.execute(update(api_keys).where(api_keys.c.id == key_id).values(**values))
        return describe_key(await _owned_key(conn, account_id, key_id))


async def revoke_api_key(engine: AsyncEngine, account_id: str, key_id: str) -> dict[str, Any]:
    """Revokes a key at once; revoking a revoked key changes nothing."""
    async with write_transaction(engine) as conn:
        row = await _owned_key(conn, account_id, key_id)
        if row.revoked_at is None:
            await conn.execute(
                update(api_keys).where(api_keys.c.id == key_id).values(revoked_at=utcnow())
            )
            row = await _owned_key(conn, account_id, key_id)
        return describe_key(row)


@dataclass(frozen=True)
class Rotation:
    created: CreatedSecret
    new_key: dict[str, Any]
    old_key: dict[str, Any]


async def rotate_api_key(
    engine: AsyncEngine, account_id: str, key_id: str, *, grace_s: int = 0
) -> Rotation:
    """A new key with the old one's name, mode, expiry and settings; the old key is
    revoked now, or with a grace period stops working ``grace_s`` seconds from now."""
    if grace_s < 0:
        raise RequestError("grace_seconds cannot be negative", param="grace_seconds")
    async with write_transaction(engine) as conn:
        old = await _owned_key(conn, account_id, key_id)
        _require_usable(old, "rotated")
        now = utcnow()
        if old.expires_at is not None and as_utc(old.expires_at) <= now:
            raise Conflict(
                f"API key {key_id!r} has expired; create a new key instead.",
                param="key_id",
                code="KEY_EXPIRED",
            )
        created = await insert_api_key(
            conn,
            account_id=account_id,
            now=now,
            name=old.name,
            mode=old.mode,
            expires_at=old.expires_at,
            settings=key_settings(old),
        )
        if grace_s == 0:
            ending: dict[str, Any] = {"revoked_at": now}
        else:
            # A grace period is an earlier expiry: the key keeps working until then.
            until = now + timedelta(seconds=grace_s)
            if old.expires_at is not None:
                until = min(until, as_utc(old.expires_at))
            ending = {"expires_at": until}
        await conn.execute(update(api_keys).where(api_keys.c.id == key_id).values(**ending))
        new_row = await _owned_key(conn, account_id, created.id)
        old_row = await _owned_key(conn, account_id, key_id)
        return Rotation(created, describe_key(new_row, now), describe_key(old_row, now))


# -- devices ----------------------------------------------------------------------------
async def create_device(
    engine: AsyncEngine, *, account_id: str, name: str = "", welcome_bonus_micros: int = 0
) -> CreatedSecret:
    """Registers a device for a provider account and returns its token (shown once).

    A positive ``welcome_bonus_micros`` grants the provider welcome bonus in the same
    transaction; the ledger takes it once per account, so later devices add nothing.
    """
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
        await grant_provider_bonus(conn, account_id, amount_micros=welcome_bonus_micros, now=now)
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
