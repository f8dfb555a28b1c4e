"""The vault's records: one sealed key per account and upstream provider.

Reads for the request path go through a small in-memory cache of *sealed* records (the
ciphertext, never the plaintext), invalidated on every write, so a request that might
use a developer's key costs no database read; the plaintext exists only inside the
request that uses it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncEngine

from swarmgate.errors import NotFound, VaultNotConfigured
from swarmgate.store.db import write_transaction
from swarmgate.store.tables import vault_keys
from swarmgate.vault.crypto import Sealed, VaultCipher, VaultError

log = logging.getLogger("swarmgate.vault")


@dataclass(frozen=True, slots=True)
class VaultEntry:
    account_id: str
    provider: str
    last4: str
    base_url: str | None
    created_at: datetime
    updated_at: datetime

    def describe(self) -> dict[str, object]:
        return {
            "exists": True,
            "provider": self.provider,
            "last4": self.last4,
            "base_url": self.base_url,
            "created_at": self.created_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
        }


@dataclass(frozen=True, slots=True)
class _Record:
    sealed: Sealed
    base_url: str | None


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _sealed(row: object) -> Sealed:
    return Sealed(
        ciphertext=bytes(row.ciphertext),  # type: ignore[attr-defined]
        nonce=bytes(row.nonce),  # type: ignore[attr-defined]
        salt=bytes(row.salt),  # type: ignore[attr-defined]
        iterations=int(row.iterations),  # type: ignore[attr-defined]
        key_version=int(row.key_version),  # type: ignore[attr-defined]
    )


class Vault:
    def __init__(self, engine: AsyncEngine, cipher: VaultCipher | None) -> None:
        self._engine = engine
        self.cipher = cipher
        self._cache: dict[tuple[str, str], _Record | None] = {}

    def _need_cipher(self) -> VaultCipher:
        if self.cipher is None:
            raise VaultNotConfigured(
                "The key vault is off: the gateway has no SWARMGATE_VAULT_MASTER_SECRET."
            )
        return self.cipher

    async def put(
        self, account_id: str, provider: str, api_key: str, base_url: str | None
    ) -> VaultEntry:
        cipher = self._need_cipher()
        sealed = await asyncio.to_thread(
            cipher.seal, api_key, account_id=account_id, provider=provider
        )
        now = datetime.now(UTC)
        values = {
            "ciphertext": sealed.ciphertext,
            "nonce": sealed.nonce,
            "salt": sealed.salt,
            "iterations": sealed.iterations,
            "key_version": sealed.key_version,
            "last4": api_key[-4:],
            "base_url": base_url,
            "updated_at": now,
        }
        where = (vault_keys.c.account_id == account_id) & (vault_keys.c.provider == provider)
        async with write_transaction(self._engine) as conn:
            created = (
                await conn.execute(select(vault_keys.c.created_at).where(where))
            ).scalar_one_or_none()
            if created is None:
                created = now
                await conn.execute(
                    vault_keys.insert().values(
                        account_id=account_id, provider=provider, created_at=now, **values
                    )
                )
            else:
                await conn.execute(vault_keys.update().where(where).values(**values))
        self._cache.pop((account_id, provider), None)
        return VaultEntry(account_id, provider, api_key[-4:], base_url, _utc(created), now)

    async def entries(self, account_id: str) -> list[VaultEntry]:
        async with self._engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(
                        vault_keys.c.provider,
                        vault_keys.c.last4,
                        vault_keys.c.base_url,
                        vault_keys.c.created_at,
                        vault_keys.c.updated_at,
                    )
                    .where(vault_keys.c.account_id == account_id)
                    .order_by(vault_keys.c.provider)
                )
            ).all()
        return [
            VaultEntry(
                account_id, r.provider, r.last4, r.base_url, _utc(r.created_at), _utc(r.updated_at)
            )
            for r in rows
        ]

    async def remove(self, account_id: str, provider: str | None) -> int:
        condition = vault_keys.c.account_id == account_id
        if provider is not None:
            condition = condition & (vault_keys.c.provider == provider)
        async with write_transaction(self._engine) as conn:
            removed = (await conn.execute(delete(vault_keys).where(condition))).rowcount
        for key in [k for k in self._cache if k[0] == account_id]:
            if provider is None or key[1] == provider:
                del self._cache[key]
        if provider is not None and not removed:
            raise NotFound(f"The vault holds no key for provider '{provider}'.")
        return int(removed or 0)

    async def key_for(self, account_id: str, provider: str) -> tuple[str, str | None] | None:
        """The account's own key (and base URL) for ``provider``, or None.

        The caller uses the plaintext for one upstream request and drops it.
        """
        if self.cipher is None:
            return None
        record = await self._record(account_id, provider)
        if record is None:
            return None
        cipher = self.cipher
        # The derived key is cached after the first use: then this is one AES-GCM call.
        plaintext = await asyncio.to_thread(
            cipher.open, record.sealed, account_id=account_id, provider=provider
        )
        return plaintext, record.base_url

    async def _record(self, account_id: str, provider: str) -> _Record | None:
        key = (account_id, provider)
        if key in self._cache:
            return self._cache[key]
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    select(vault_keys).where(
                        (vault_keys.c.account_id == account_id)
                        & (vault_keys.c.provider == provider)
                    )
                )
            ).first()
        record = None if row is None else _Record(_sealed(row), row.base_url)
        if len(self._cache) > 50_000:
            self._cache.clear()
        self._cache[key] = record
        return record


async def rotate_master(engine: AsyncEngine, old: VaultCipher, new: VaultCipher) -> int:
    """Re-encrypts every record from ``old`` to ``new``; returns the count.

    The slow part (PBKDF2 per record) runs before the write transaction, so the database
    is locked only for the updates. A record that does not open with ``old``, or that
    changed meanwhile, stops the rotation with nothing changed.
    """
    async with engine.connect() as conn:
        rows = (await conn.execute(select(vault_keys))).all()
    updates = []
    for row in rows:
        try:
            plaintext = await asyncio.to_thread(
                old.open, _sealed(row), account_id=row.account_id, provider=row.provider
            )
        except VaultError as exc:
            raise VaultError(
                f"the record of account {row.account_id} for {row.provider} does not open "
                "with the old master secret; nothing was changed"
            ) from exc
        sealed = await asyncio.to_thread(
            new.seal, plaintext, account_id=row.account_id, provider=row.provider
        )
        del plaintext
        updates.append((row, sealed))
    async with write_transaction(engine) as conn:
        for row, sealed in updates:
            changed = await conn.execute(
                vault_keys.update()
                .where(
                    (vault_keys.c.account_id == row.account_id)
                    & (vault_keys.c.provider == row.provider)
                    & (vault_keys.c.ciphertext == row.ciphertext)
                )
                .values(
                    ciphertext=sealed.ciphertext,
                    nonce=sealed.nonce,
                    salt=sealed.salt,
                    iterations=sealed.iterations,
                    key_version=sealed.key_version,
                    updated_at=datetime.now(UTC),
                )
            )
            if changed.rowcount != 1:
                raise VaultError(
                    f"the record of account {row.account_id} for {row.provider} changed during "
                    "the rotation; nothing was changed, run it again"
                )
    log.info("vault master secret rotated", extra={"records": len(updates)})
    return len(updates)
