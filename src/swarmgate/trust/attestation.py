"""Device integrity attestations: Google Play Integrity (classic requests) behind a small
interface that other attestations can implement.

The classic flow:

1. the device asks the gateway for a nonce (``NonceBook.issue``: single use, bound to
   the device, short-lived);
2. the app asks Play Integrity for a token over that nonce and sends it to the gateway;
3. the gateway decrypts the token, a compact JWE (``A256KW`` key wrap, ``A256GCM``
   content) with the decryption key from the Play Console, and verifies the JWS inside
   (``ES256``) with the verification key from the Play Console; then checks the package
   name, the signing certificate's digest, the nonce, the timestamp's freshness and
   ``MEETS_DEVICE_INTEGRITY``, and that this token was not seen before.

Nothing here logs a token or its contents.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap

PLAY_INTEGRITY = "play_integrity"
MEETS_DEVICE_INTEGRITY = "MEETS_DEVICE_INTEGRITY"
FUTURE_SKEW_S = 60.0


class AttestationRejected(Exception):
    """An attestation that does not prove what it must; ``reason`` is a short code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Attestation:
    kind: str
    device_id: str
    verdicts: tuple[str, ...]
    package_name: str
    issued_at: datetime


class Verifier(Protocol):
    kind: str

    def verify(
        self, token: str, *, device_id: str, nonce: str, now: datetime | None = None
    ) -> Attestation: ...


def b64url_decode(text: str) -> bytes:
    """Base64url with or without padding; anything else is malformed."""
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise AttestationRejected("malformed", "the token is not base64url") from exc


def _b64_any(text: str) -> bytes:
    """Keys from the Play Console come as standard base64; accept url-safe too."""
    cleaned = "".join(text.split())
    padded = cleaned + "=" * (-len(cleaned) % 4)
    try:
        if "-" in cleaned or "_" in cleaned:
            return base64.urlsafe_b64decode(padded)
        return base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not valid base64") from exc


def _normalise_nonce(nonce: str) -> bytes:
    return nonce.rstrip("=").encode()


class NonceBook:
    """Single-use nonces bound to a device, for a limited time, in bounded memory."""

    def __init__(
        self,
        ttl_s: float = 600.0,
        per_device: int = 8,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl_s = ttl_s
        self._per_device = per_device
        self._clock = clock
        # device id → nonce → expiry, oldest first
        self._issued: dict[str, OrderedDict[str, float]] = {}

    def issue(self, device_id: str) -> str:
        # 32 random bytes, base64url without padding: within Play Integrity's 16..500 chars.
        nonce = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
        now = self._clock()
        mine = self._prune(device_id, now)
        mine[nonce] = now + self.ttl_s
        while len(mine) > self._per_device:
            mine.popitem(last=False)  # the oldest outstanding nonce lapses
        return nonce

    def consume(self, device_id: str, nonce: str) -> None:
        """Accepts ``nonce`` once for ``device_id``; raises AttestationRejected otherwise."""
        now = self._clock()
        mine = self._issued.get(device_id)
        key = nonce.rstrip("=")
        expiry = mine.pop(key, None) if mine is not None else None
        if mine is not None and not mine:
            del self._issued[device_id]
        if expiry is None:
            raise AttestationRejected(
                "nonce_mismatch", "the nonce was not issued to this device, or was used"
            )
        if expiry < now:
            raise AttestationRejected("nonce_expired", "the nonce has expired; ask for a new one")

    def _prune(self, device_id: str, now: float) -> OrderedDict[str, float]:
        mine = self._issued.setdefault(device_id, OrderedDict())
        for nonce in [n for n, expiry in mine.items() if expiry < now]:
            del mine[nonce]
        if len(self._issued) > 10_000:
            for other in [d for d, m in self._issued.items() if not m]:
                del self._issued[other]
        return mine


class PlayIntegrityVerifier:
    kind = PLAY_INTEGRITY

    def __init__(
        self,
        decryption_key: bytes,
        verification_key: ec.EllipticCurvePublicKey,
        package_name: str,
        certificate_sha256_digests: Iterable[str],
        max_age_s: float = 300.0,
        remember: int = 100_000,
    ) -> None:
        if len(decryption_key) != 32:
            raise ValueError("the Play Integrity decryption key must be 32 bytes (AES-256)")
        if not isinstance(verification_key.curve, ec.SECP256R1):
            raise ValueError("the Play Integrity verification key must be EC P-256")
        self._aes_key = decryption_key
        self._public_key = verification_key
        self.package_name = package_name
        self._digests = frozenset(d.rstrip("=") for d in certificate_sha256_digests)
        self._max_age_s = max_age_s
        self._remember = remember
        self._seen: OrderedDict[bytes, float] = OrderedDict()  # token digest → expiry

    @classmethod
    def from_config(
        cls,
        *,
        decryption_key_b64: str,
        verification_key_b64: str,
        package_name: str,
        certificate_digests: Iterable[str],
        max_age_s: float = 300.0,
    ) -> PlayIntegrityVerifier:
        """From the Play Console's keys: the AES decryption key and the DER public key,
        both base64."""
        public = serialization.load_der_public_key(_b64_any(verification_key_b64))
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise ValueError("the Play Integrity verification key is not an EC key")
        return cls(
            _b64_any(decryption_key_b64), public, package_name, certificate_digests, max_age_s
        )

    def verify(
        self, token: str, *, device_id: str, nonce: str, now: datetime | None = None
    ) -> Attestation:
        now = now or datetime.now(UTC)
        digest = hashlib.sha256(token.encode()).digest()
        self._forget_old(now.timestamp())
        if digest in self._seen:
            raise AttestationRejected("replayed", "this integrity token was already used")
        payload = self._verify_jws(self._decrypt(token))
        verdict = self._check(payload, nonce, now)
        self._seen[digest] = now.timestamp() + self._max_age_s + FUTURE_SKEW_S
        while len(self._seen) > self._remember:
            self._seen.popitem(last=False)
        return Attestation(
            kind=PLAY_INTEGRITY,
            device_id=device_id,
            verdicts=verdict[0],
            package_name=self.package_name,
            issued_at=verdict[1],
        )

    # -- JWE and JWS ----------------------------------------------------------------------
    def _decrypt(self, token: str) -> bytes:
        parts = token.strip().split(".")
        if len(parts) != 5:
            raise AttestationRejected("malformed", "the token is not a compact JWE")
        protected, wrapped_key, iv, ciphertext, tag = parts
        try:
            header = orjson.loads(b64url_decode(protected))
        except orjson.JSONDecodeError as exc:
            raise AttestationRejected("malformed", "the JWE header is not JSON") from exc
        if not isinstance(header, dict) or header.get("alg") != "A256KW":
            raise AttestationRejected("bad_encryption", "the JWE must use alg A256KW")
        if header.get("enc") != "A256GCM":
            raise AttestationRejected("bad_encryption", "the JWE must use enc A256GCM")
        try:
            key = aes_key_unwrap(self._aes_key, b64url_decode(wrapped_key))
            return AESGCM(key).decrypt(
                b64url_decode(iv),
                b64url_decode(ciphertext) + b64url_decode(tag),
                protected.encode("ascii"),
            )
        except (InvalidUnwrap, InvalidTag, ValueError) as exc:
            raise AttestationRejected("bad_encryption", "the token could not be decrypted") from exc

    def _verify_jws(self, jws: bytes) -> dict[str, Any]:
        parts = jws.split(b".")
        if len(parts) != 3:
            raise AttestationRejected("malformed", "the decrypted token is not a compact JWS")
        try:
            header = orjson.loads(b64url_decode(parts[0].decode("ascii")))
        except (orjson.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AttestationRejected("malformed", "the JWS header is not JSON") from exc
        if not isinstance(header, dict) or header.get("alg") != "ES256":
            raise AttestationRejected("bad_signature", "the JWS must be signed ES256")
        signature = b64url_decode(parts[2].decode("ascii"))
        if len(signature) != 64:
            raise AttestationRejected("bad_signature", "an ES256 signature is 64 bytes")
        der = encode_dss_signature(
            int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        )
        try:
            self._public_key.verify(der, parts[0] + b"." + parts[1], ec.ECDSA(hashes.SHA256()))
        except InvalidSignature as exc:
            raise AttestationRejected("bad_signature", "the verdict's signature is wrong") from exc
        try:
            payload = orjson.loads(b64url_decode(parts[1].decode("ascii")))
        except (orjson.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AttestationRejected("malformed", "the verdict is not JSON") from exc
        if not isinstance(payload, dict):
            raise AttestationRejected("malformed", "the verdict is not a JSON object")
        return payload

    # -- the verdict ----------------------------------------------------------------------
    def _check(
        self, payload: dict[str, Any], nonce: str, now: datetime
    ) -> tuple[tuple[str, ...], datetime]:
        try:
            request = payload["requestDetails"]
            app = payload["appIntegrity"]
            device = payload["deviceIntegrity"]
            request_package = str(request["requestPackageName"])
            got_nonce = str(request["nonce"])
            millis = int(request["timestampMillis"])
            app_verdict = str(app["appRecognitionVerdict"])
            app_package = app.get("packageName")
            digests = [str(d).rstrip("=") for d in app.get("certificateSha256Digest") or []]
            verdicts = tuple(str(v) for v in device.get("deviceRecognitionVerdict") or [])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise AttestationRejected("malformed", "the verdict lacks a required field") from exc
        if request_package != self.package_name or (
            app_package is not None and app_package != self.package_name
        ):
            raise AttestationRejected("wrong_package", "the verdict is for another app")
        if app_verdict != "PLAY_RECOGNIZED":
            raise AttestationRejected("app_not_recognized", "Play does not recognise this app")
        if not self._digests.intersection(digests):
            raise AttestationRejected(
                "wrong_certificate", "the app is not signed with a known certificate"
            )
        if not hmac.compare_digest(_normalise_nonce(got_nonce), _normalise_nonce(nonce)):
            raise AttestationRejected("nonce_mismatch", "the verdict is for another nonce")
        issued = datetime.fromtimestamp(millis / 1000, UTC)
        age = (now - issued).total_seconds()
        if age > self._max_age_s or age < -FUTURE_SKEW_S:
            raise AttestationRejected("stale", "the verdict is too old or from the future")
        if MEETS_DEVICE_INTEGRITY not in verdicts:
            raise AttestationRejected(
                "integrity_not_met", "the device does not meet Play's device integrity"
            )
        return verdicts, issued

    def _forget_old(self, now: float) -> None:
        while self._seen:
            digest, expiry = next(iter(self._seen.items()))
            if expiry >= now:
                break
            del self._seen[digest]
