"""The stored side of ``Idempotency-Key`` (see ``api/idempotency.py``): one row per
(account, key), claimed by the first request and holding its response for replays.
Scaled out, the same calls keep the records in Redis (``cluster/idempotency.py``)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

import orjson
from sqlalchemy import ColumnElement, and_, delete, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from swarmgate.accounts.keys import utcnow
from swarmgate.errors import Conflict, IdempotencyMismatch
from swarmgate.store.db import as_utc
from swarmgate.store.tables import idempotency_keys


@dataclass(frozen=True, slots=True)
class StoredResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


def mismatch() -> IdempotencyMismatch:
    return IdempotencyMismatch(
        "This Idempotency-Key was used with a different request (method, path or body). "
        "Use a new key for a new request.",
        param="Idempotency-Key",
    )


def in_progress() -> Conflict:
    return Conflict(
        "A request with this Idempotency-Key is still running. Retry after it has finished "
        "to get its response.",
        param="Idempotency-Key",
        code="IDEMPOTENCY_IN_PROGRESS",
        retry_after=1,
    )


def contended() -> Conflict:
    return Conflict(
        "This Idempotency-Key is contended; retry.",
        param="Idempotency-Key",
        code="IDEMPOTENCY_IN_PROGRESS",
        retry_after=1,
    )


class Idempotency(Protocol):
    """Where ``Idempotency-Key`` records live: the database, or Redis when scaled out."""

    async def begin(self, account_id: str, key: str, fingerprint: str) -> StoredResponse | None:
        """Claims the key (None: run the request) or returns the stored response."""

    async def finish(self, account_id: str, key: str, response: StoredResponse | None) -> None:
        """Stores the response for replays, or (None) frees the key."""

    async def purge_expired(self) -> int:
        """Deletes expired records; how many."""


def request_fingerprint(method: str, path: str, body: bytes) -> str:
    digest = hashlib.sha256()
    for part in (method.encode(), b"\0", path.encode(), b"\0", body):
        digest.update(part)
    return digest.hexdigest()


class IdempotencyStore:
    def __init__(self, engine: AsyncEngine, *, ttl_s: float, takeover_after_s: float) -> None:
        self._engine = engine
        self._ttl = timedelta(seconds=ttl_s)
        self._takeover = timedelta(seconds=takeover_after_s)

    async def begin(self, account_id: str, key: str, fingerprint: str) -> StoredResponse | None:
        """Claims the key for this request (None: run it) or returns the stored response.

        Raises IdempotencyMismatch (another request used the key) or Conflict (the
        first request with the key is still running).
        """
        now = utcnow()
        row_values = {
            "account_id": account_id,
            "key": key,
            "request_hash": fingerprint,
            "status": "in_progress",
            "created_at": now,
            "expires_at": now + self._ttl,
        }
        for _ in range(3):
            try:
                async with self._engine.begin() as conn:
                    await conn.execute(insert(idempotency_keys).values(**row_values))
                return None
            except IntegrityError:
                pass
            async with self._engine.begin() as conn:
                row = (
                    await conn.execute(select(idempotency_keys).where(_key_is(account_id, key)))
                ).first()
                if row is None:
                    continue  # deleted in between: claim it again
                if as_utc(row.expires_at) <= now:
                    await conn.execute(delete(idempotency_keys).where(_key_is(account_id, key)))
                    continue
                if row.request_hash != fingerprint:
                    raise mismatch()
                if row.status == "done":
                    return StoredResponse(
                        status=int(row.response_status),
                        headers=[
                            (name.encode("latin-1"), value.encode("latin-1"))
                            for name, value in orjson.loads(row.response_headers or "[]")
                        ],
                        body=(row.response_body or "").encode(),
                    )
                if as_utc(row.created_at) + self._takeover > now:
                    raise in_progress()
                # Its first run never finished (the gateway stopped): this retry takes over.
                taken = await conn.execute(
                    update(idempotency_keys)
                    .where(_key_is(account_id, key))
                    .where(idempotency_keys.c.created_at == row.created_at)
                    .values(created_at=now)
                )
                if taken.rowcount == 1:
                    return None
        raise contended()

    async def finish(self, account_id: str, key: str, response: StoredResponse | None) -> None:
        """Stores the response for replays, or (None) frees the key for a retry."""
        async with self._engine.begin() as conn:
            if response is None:
                await conn.execute(delete(idempotency_keys).where(_key_is(account_id, key)))
                return
            await conn.execute(
                update(idempotency_keys)
                .where(_key_is(account_id, key))
                .values(
                    status="done",
                    response_status=response.status,
                    response_headers=orjson.dumps(
                        [(n.decode("latin-1"), v.decode("latin-1")) for n, v in response.headers]
                    ).decode(),
                    response_body=response.body.decode(errors="replace"),
                )
            )

    async def purge_expired(self, now: datetime | None = None) -> int:
        async with self._engine.begin() as conn:
            result = await conn.execute(
                delete(idempotency_keys).where(idempotency_keys.c.expires_at <= (now or utcnow()))
            )
        return int(result.rowcount or 0)


def _key_is(account_id: str, key: str) -> ColumnElement[bool]:
    return and_(idempotency_keys.c.account_id == account_id, idempotency_keys.c.key == key)
