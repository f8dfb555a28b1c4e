"""Sign-up and sign-in with an email and a password, and the sessions they open.

Passwords are hashed with argon2id. Hashing is deliberately slow (tens of milliseconds
and tens of MiB), so it always runs in a worker thread, never on the event loop. A
session is an opaque ``sg_sess_<random>`` token; the database keeps only its SHA-256
digest, like an API key's.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import argon2
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from swarmgate.accounts import service
from swarmgate.accounts.keys import NO_LIMITS, Principal, new_id, utcnow
from swarmgate.errors import AuthError, RequestError
from swarmgate.store.db import as_utc
from swarmgate.store.tables import accounts, sessions

SESSION_PREFIX = "sg_sess_"
_SESSION_BYTES = 32  # 256 bits
MIN_PASSWORD_LENGTH = 8
MAX_PASSWORD_LENGTH = 1024
MAX_EMAIL_LENGTH = 320

Role = Literal["developer", "provider"]

_EMAIL = re.compile(r"[^@\s]{1,64}@[^@\s]+\.[^@\s.]+")
_SIGNIN_FAILED = "Incorrect email or password."
_SESSION_INVALID = "Missing, expired or revoked session token. Sign in again."


def normalise_email(email: str) -> str:
    """The one form an email is stored and looked up in; raises RequestError if implausible.

    The check is deliberately simple: real validation is a message that arrives.
    """
    normal = email.strip().lower()
    if len(normal) > MAX_EMAIL_LENGTH or not _EMAIL.fullmatch(normal):
        raise RequestError(f"{email!r} is not a valid email address.", param="email")
    return normal


def check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise RequestError(
            f"The password must be at least {MIN_PASSWORD_LENGTH} characters long.",
            param="password",
        )
    if len(password) > MAX_PASSWORD_LENGTH:
        raise RequestError(
            f"The password must be at most {MAX_PASSWORD_LENGTH} characters long.",
            param="password",
        )


def session_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class PasswordHashing:
    """argon2id hashing and verification, off the event loop."""

    def __init__(self, hasher: argon2.PasswordHasher | None = None) -> None:
        self._hasher = hasher or argon2.PasswordHasher()  # argon2id, RFC 9106 parameters
        self._decoy: str | None = None

    async def hash(self, password: str) -> str:
        return await asyncio.to_thread(self._hasher.hash, password)

    async def verify(self, password_hash: str | None, password: str) -> bool:
        """True if the password matches; with no hash, spends the same time and says False,
        so a response's timing does not tell whether an email has an account."""
        if password_hash is None:
            if self._decoy is None:
                self._decoy = await self.hash(secrets.token_urlsafe(16))
            password_hash = self._decoy
            password = ""
        try:
            return await asyncio.to_thread(self._hasher.verify, password_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def needs_rehash(self, password_hash: str) -> bool:
        return self._hasher.check_needs_rehash(password_hash)


@dataclass(frozen=True)
class OpenedSession:
    id: str
    account_id: str
    token: str
    expires_at: datetime

    def describe(self) -> dict[str, Any]:
        return {
            "object": "session",
            "id": self.id,
            "account_id": self.account_id,
            "token": self.token,
            "expires_at": self.expires_at.isoformat(),
        }


async def insert_session(
    conn: AsyncConnection, *, account_id: str, ttl_s: float, now: datetime
) -> OpenedSession:
    token = SESSION_PREFIX + secrets.token_urlsafe(_SESSION_BYTES)
    session_id = new_id("sess")
    expires_at = now + timedelta(seconds=ttl_s)
    await conn.execute(
        insert(sessions).values(
            id=session_id,
            account_id=account_id,
            digest=session_digest(token),
            created_at=now,
            expires_at=expires_at,
        )
    )
    return OpenedSession(session_id, account_id, token, expires_at)


@dataclass(frozen=True)
class SignedUp:
    account: dict[str, Any]
    key: service.CreatedSecret
    key_description: dict[str, Any]
    session: OpenedSession


async def sign_up(
    engine: AsyncEngine,
    hashing: PasswordHashing,
    *,
    email: str,
    password: str,
    name: str | None,
    roles: list[Role],
    welcome_credit_micros: int,
    session_ttl_s: float,
) -> SignedUp:
    """Creates an account with welcome credit (and as much sandbox play credit), a first
    live API key and a session, all in one database transaction."""
    email = normalise_email(email)
    check_password(password)
    if not roles:
        raise RequestError("Give at least one role: 'developer' or 'provider'.", param="roles")
    async with engine.connect() as conn:
        taken = await service.email_taken(conn, email)
    if taken:
        # Checked before the slow hash; the unique index below still decides a race.
        raise service.email_taken_error(email)
    password_hash = await hashing.hash(password)
    account_name = name if name else email.split("@", 1)[0]
    try:
        async with engine.begin() as conn:
            now = utcnow()
            account_id = await service.insert_account(
                conn,
                name=account_name,
                email=email,
                now=now,
                credit_micros=welcome_credit_micros,
                sandbox_credit_micros=welcome_credit_micros,
                developer="developer" in roles,
                provider="provider" in roles,
                password_hash=password_hash,
            )
            key = await service.insert_api_key(
                conn, account_id=account_id, now=now, name="default", mode="live"
            )
            session = await insert_session(
                conn, account_id=account_id, ttl_s=session_ttl_s, now=now
            )
            account_row = (
                await conn.execute(select(accounts).where(accounts.c.id == account_id))
            ).one()
            key_description = await service.owned_key_description(conn, account_id, key.id)
    except IntegrityError as exc:
        await service.raise_if_email_taken(engine, email, exc)
        raise
    return SignedUp(service.describe_account(account_row), key, key_description, session)


async def sign_in(
    engine: AsyncEngine,
    hashing: PasswordHashing,
    *,
    email: str,
    password: str,
    session_ttl_s: float,
) -> OpenedSession:
    """A new session for the right email and password; one and the same 401 otherwise."""
    try:
        email = normalise_email(email)
    except RequestError:
        email = ""
    row = None
    if email:
        query = select(accounts.c.id, accounts.c.password_hash).where(accounts.c.email == email)
        async with engine.connect() as conn:
            row = (await conn.execute(query)).first()
    stored = row.password_hash if row is not None else None
    if not await hashing.verify(stored, password) or row is None:
        raise AuthError(_SIGNIN_FAILED)
    rehashed = None
    if stored is not None and hashing.needs_rehash(stored):
        # The parameters were raised since this hash was made; upgrade it while we can.
        rehashed = await hashing.hash(password)
    async with engine.begin() as conn:
        if rehashed is not None:
            await conn.execute(
                update(accounts).where(accounts.c.id == row.id).values(password_hash=rehashed)
            )
        return await insert_session(conn, account_id=row.id, ttl_s=session_ttl_s, now=utcnow())


class SessionVerifier:
    """Verifies session tokens, with a short in-memory cache like ``KeyVerifier``'s.

    A session revoked through this process is dropped from the cache at once; another
    gateway process notices within the cache TTL.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        ttl_s: float = 30.0,
        max_entries: int = 100_000,
        passwords: PasswordHashing | None = None,
    ) -> None:
        self._engine = engine
        # What opens a session: one hasher per gateway, so its decoy hash is made once.
        self.passwords = passwords or PasswordHashing()
        self._ttl = ttl_s
        self._max = max_entries
        self._cache: OrderedDict[str, tuple[float, Principal | None]] = OrderedDict()

    async def verify(self, token: str | None) -> Principal:
        if not token or not token.startswith(SESSION_PREFIX) or len(token) > 128:
            raise AuthError(_SESSION_INVALID)
        digest = session_digest(token)
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            principal = cached[1]
        else:
            principal, lifetime = await self._load(digest)
            # Unknown tokens are cached too (briefly), so a flood of them stays off the DB.
            ttl = min(self._ttl, lifetime) if principal is not None else min(self._ttl, 5.0)
            self._cache[digest] = (now + ttl, principal)
            self._cache.move_to_end(digest)
            while len(self._cache) > self._max:
                self._cache.popitem(last=False)
        if principal is None:
            raise AuthError(_SESSION_INVALID)
        return principal

    async def _load(self, digest: str) -> tuple[Principal | None, float]:
        query = select(sessions.c.account_id, sessions.c.expires_at, sessions.c.revoked_at).where(
            sessions.c.digest == digest
        )
        async with self._engine.connect() as conn:
            row = (await conn.execute(query)).first()
        if row is None or row.revoked_at is not None:
            return None, 0.0
        remaining = (as_utc(row.expires_at) - utcnow()).total_seconds()
        if remaining <= 0:
            return None, 0.0
        principal = Principal(
            account_id=row.account_id, key_id=None, mode="live", settings=NO_LIMITS
        )
        return principal, remaining

    def forget(self, token: str) -> None:
        self._cache.pop(session_digest(token), None)

    async def revoke(self, token: str) -> bool:
        """Ends a session now; False if there was no live session with this token."""
        digest = session_digest(token)
        async with self._engine.begin() as conn:
            result = await conn.execute(
                update(sessions)
                .where(sessions.c.digest == digest, sessions.c.revoked_at.is_(None))
                .values(revoked_at=utcnow())
            )
        self._cache.pop(digest, None)
        return bool(result.rowcount)
