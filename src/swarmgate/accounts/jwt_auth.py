"""JWT bearer tokens from an outside identity provider, verified against its JWKS.

Only asymmetric signatures are accepted (RS256, ES256): with a public JWKS, an HMAC or
"none" token could be forged by anyone. The signing keys come from ``jwks_url`` (or
``jwks_file``), cached by ``kid``. They are reloaded when older than
``jwks_refresh_s``, and at once (at most every few seconds) when a token names a
``kid`` the cache does not have, so the provider can rotate keys without a restart.

A token's ``sub``, per issuer, maps through ``account_identities`` to one account; the
first token for a subject creates that account with the usual welcome credit.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import httpx
import jwt
import orjson
from jwt.exceptions import (
    ExpiredSignatureError,
    ImmatureSignatureError,
    InvalidAlgorithmError,
    InvalidAudienceError,
    InvalidIssuerError,
    InvalidKeyError,
    InvalidSignatureError,
    InvalidTokenError,
    MissingRequiredClaimError,
    PyJWKError,
)
from sqlalchemy.ext.asyncio import AsyncEngine

from swarmgate.accounts import service
from swarmgate.accounts.keys import NO_LIMITS, Principal
from swarmgate.accounts.signin import normalise_email
from swarmgate.config import GatewaySettings
from swarmgate.errors import AuthError, RequestError

log = logging.getLogger("swarmgate.accounts.jwt")

ALLOWED_ALGORITHMS = frozenset({"RS256", "ES256"})
LEEWAY_S = 10  # clock skew tolerated on exp, nbf and iat
MAX_TOKEN_LENGTH = 16_384
_MAX_CLAIM_LENGTH = 400  # the identity columns' width
_RETRY_AFTER_FAILURE_S = 10.0


class SigningKeys:
    """One loaded JWKS: usable RS256/ES256 verification keys, by ``kid`` and without one."""

    def __init__(self, by_kid: dict[str, jwt.PyJWK], unnamed: list[jwt.PyJWK]) -> None:
        self.by_kid = by_kid
        self.unnamed = unnamed

    def __len__(self) -> int:
        return len(self.by_kid) + len(self.unnamed)

    def candidates(self, kid: str | None, alg: str) -> list[jwt.PyJWK]:
        if kid is not None:
            key = self.by_kid.get(kid)
            return [] if key is None else [key]
        return [k for k in [*self.by_kid.values(), *self.unnamed] if k.algorithm_name == alg]


def parse_jwks(document: Any) -> SigningKeys:
    """The usable signing keys of a JWKS document; others (HMAC, encryption, unknown
    types, malformed entries) are skipped. Raises ValueError if it is no JWKS at all."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("a JWKS is a JSON object with a 'keys' list")
    by_kid: dict[str, jwt.PyJWK] = {}
    unnamed: list[jwt.PyJWK] = []
    for entry in document["keys"]:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        try:
            key = jwt.PyJWK(entry)
        except (PyJWKError, InvalidKeyError, ValueError, TypeError):
            continue
        if key.algorithm_name not in ALLOWED_ALGORITHMS:
            continue
        kid = entry.get("kid")
        if isinstance(kid, str) and kid:
            by_kid[kid] = key
        else:
            unnamed.append(key)
    return SigningKeys(by_kid, unnamed)


def _claim_text(claims: dict[str, Any], name: str) -> str | None:
    value = claims.get(name)
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


class JwtVerifier:
    """Verifies JWT bearer tokens and maps their subject to an account."""

    def __init__(
        self,
        engine: AsyncEngine,
        settings: GatewaySettings,
        *,
        unknown_kid_refetch_s: float = 10.0,
        max_cached_tokens: int = 10_000,
    ) -> None:
        if not settings.jwks_url and settings.jwks_file is None:
            raise ValueError("JWT auth needs SWARMGATE_JWKS_URL or SWARMGATE_JWKS_FILE")
        self._engine = engine
        self._url = settings.jwks_url
        self._file: Path | None = settings.jwks_file
        self._issuer = settings.jwt_issuer or None
        self._audience = settings.jwt_audience or None
        self._refresh_s = settings.jwks_refresh_s
        self._welcome_credit = settings.welcome_credit_micros
        self._unknown_kid_gap = unknown_kid_refetch_s
        self._max_cached = max_cached_tokens
        self._keys = SigningKeys({}, [])
        self._next_refresh = 0.0  # monotonic; 0: never loaded
        self._last_unknown_kid_refetch = float("-inf")
        self._generation = 0
        self._lock = asyncio.Lock()
        self._http: httpx.AsyncClient | None = None
        # token digest -> (exp as a Unix time, principal)
        self._tokens: OrderedDict[str, tuple[float, Principal]] = OrderedDict()
        self._accounts: OrderedDict[tuple[str, str], str] = OrderedDict()

    async def verify(self, token: str) -> Principal:
        if len(token) > MAX_TOKEN_LENGTH:
            raise AuthError("The JWT is too long.")
        digest = hashlib.sha256(token.encode()).hexdigest()
        cached = self._tokens.get(digest)
        if cached is not None:
            if cached[0] > time.time():
                return cached[1]
            del self._tokens[digest]
        claims = await self._verified_claims(token)
        issuer = _claim_text(claims, "iss") or ""
        subject = claims["sub"]
        if not isinstance(subject, str) or not subject or len(subject) > _MAX_CLAIM_LENGTH:
            raise AuthError("The JWT's 'sub' claim must be a non-empty string.")
        if len(issuer) > _MAX_CLAIM_LENGTH:
            raise AuthError("The JWT's 'iss' claim is too long.")
        account_id = await self._account_for(issuer, subject, claims)
        principal = Principal(account_id=account_id, key_id=None, mode="live", settings=NO_LIMITS)
        self._tokens[digest] = (float(claims["exp"]), principal)
        while len(self._tokens) > self._max_cached:
            self._tokens.popitem(last=False)
        return principal

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    # -- signature and claims ----------------------------------------------------------
    async def _verified_claims(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except InvalidTokenError as exc:
            raise AuthError("Malformed JWT: the header cannot be read.") from exc
        alg = header.get("alg")
        if alg not in ALLOWED_ALGORITHMS:
            raise AuthError(f"JWT algorithm {alg!r} is not accepted; sign with RS256 or ES256.")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise AuthError("The JWT's 'kid' header must be a string.")
        candidates = await self._keys_for(kid, alg)
        required = ["exp", "sub"]
        if self._issuer is not None:
            required.append("iss")
        if self._audience is not None:
            required.append("aud")
        failure: AuthError | None = None
        for key in candidates:
            try:
                claims: dict[str, Any] = jwt.decode(
                    token,
                    key=key,
                    algorithms=[alg],
                    audience=self._audience,
                    issuer=self._issuer,
                    leeway=LEEWAY_S,
                    options={
                        "require": required,
                        # Always on: without a configured audience, a token meant for
                        # some audience is refused rather than accepted for any.
                        "verify_aud": True,
                        "enforce_minimum_key_length": True,
                    },
                )
            except InvalidSignatureError as exc:
                # Without a kid several keys may fit; only a failure with all of them counts.
                failure = AuthError("The JWT's signature does not verify.")
                failure.__cause__ = exc
                continue
            except InvalidTokenError as exc:
                raise self._explain(exc) from exc
            return claims
        raise failure or AuthError("No signing key fits the JWT.")

    def _explain(self, exc: InvalidTokenError) -> AuthError:
        if isinstance(exc, ExpiredSignatureError):
            return AuthError("The JWT has expired.")
        if isinstance(exc, ImmatureSignatureError):
            return AuthError("The JWT is not valid yet (its 'nbf' or 'iat' is in the future).")
        if isinstance(exc, InvalidAudienceError):
            if self._audience is None:
                return AuthError(
                    "The JWT names an audience, but this gateway has none configured "
                    "(SWARMGATE_JWT_AUDIENCE)."
                )
            return AuthError(f"The JWT's audience does not include {self._audience!r}.")
        if isinstance(exc, InvalidIssuerError):
            return AuthError(f"The JWT's issuer is not {self._issuer!r}.")
        if isinstance(exc, MissingRequiredClaimError):
            return AuthError(f"The JWT has no {exc.claim!r} claim.")
        if isinstance(exc, InvalidAlgorithmError):
            return AuthError("The JWT's algorithm does not match its signing key.")
        if isinstance(exc, InvalidKeyError):
            return AuthError("The JWT's signing key is too weak.")
        return AuthError(f"Invalid JWT: {exc}.")

    # -- the JWKS ----------------------------------------------------------------------
    async def _keys_for(self, kid: str | None, alg: str) -> list[jwt.PyJWK]:
        if time.monotonic() >= self._next_refresh:
            await self._refresh(self._generation)
        candidates = self._keys.candidates(kid, alg)
        if not candidates and kid is not None:
            now = time.monotonic()
            # A kid we have not seen may be a freshly rotated key; rate-limited so a
            # flood of made-up kids cannot turn into a flood of JWKS requests.
            if now - self._last_unknown_kid_refetch >= self._unknown_kid_gap:
                self._last_unknown_kid_refetch = now
                await self._refresh(self._generation)
                candidates = self._keys.candidates(kid, alg)
        if not candidates:
            if not self._keys:
                raise AuthError("The JWT signing keys could not be loaded; try again shortly.")
            named = f"signing key {kid!r}" if kid is not None else f"{alg} signing key"
            raise AuthError(f"The JWT names an unknown {named}.")
        return candidates

    async def _refresh(self, seen_generation: int) -> None:
        async with self._lock:
            if self._generation != seen_generation:
                return  # another request reloaded the keys while this one waited
            try:
                keys = parse_jwks(orjson.loads(await self._fetch()))
            except (httpx.HTTPError, OSError, ValueError) as exc:
                log.warning("loading the JWKS failed: %s", exc)
                self._next_refresh = time.monotonic() + min(self._refresh_s, _RETRY_AFTER_FAILURE_S)
                return
            self._keys = keys
            self._generation += 1
            self._next_refresh = time.monotonic() + self._refresh_s

    async def _fetch(self) -> bytes:
        if self._url:
            if self._http is None:
                self._http = httpx.AsyncClient(timeout=10.0, follow_redirects=False)
            response = await self._http.get(self._url, headers={"Accept": "application/json"})
            response.raise_for_status()
            return response.content
        assert self._file is not None
        return await asyncio.to_thread(self._file.read_bytes)

    # -- subject to account ------------------------------------------------------------
    async def _account_for(self, issuer: str, subject: str, claims: dict[str, Any]) -> str:
        known = self._accounts.get((issuer, subject))
        if known is not None:
            return known
        account_id = await service.account_for_identity(self._engine, issuer, subject)
        if account_id is None:
            email = _claim_text(claims, "email")
            if email is not None:
                try:
                    email = normalise_email(email)
                except RequestError:
                    email = None
            name = _claim_text(claims, "name") or email or subject
            account_id = await service.create_identity_account(
                self._engine,
                issuer=issuer,
                subject=subject,
                name=name[:200],
                email=email,
                credit_micros=self._welcome_credit,
                sandbox_credit_micros=self._welcome_credit,
            )
        self._accounts[(issuer, subject)] = account_id
        while len(self._accounts) > self._max_cached:
            self._accounts.popitem(last=False)
        return account_id
