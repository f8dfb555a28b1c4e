"""Device integrity attestations: Google Play Integrity (classic requests) behind a small
interface that other attestations can implement.

The classic flow, and which piece here handles each step:

1. the device asks the gateway for a nonce: ``NonceBook.issue`` (single use, bound to the
   device, short-lived);
2. the app asks Play Integrity for a token over that nonce and sends both to the gateway,
   which spends the nonce with ``NonceBook.consume``;
3. ``PlayIntegrityVerifier.verify`` opens the token, a compact JWE (``A256KW`` key wrap,
   ``A256GCM`` content) with the decryption key from the Play Console, checks the ES256 JWS
   inside with the verification key from the Play Console, then checks the verdict: the
   package, the nonce, the timestamp's freshness, Play's recognition of the app, its
   signing certificate and ``MEETS_DEVICE_INTEGRITY``; and that this verdict was not
   accepted before.

Two layers stop replays on purpose: the nonce book refuses a nonce twice, and the verifier
refuses a verdict twice, so a token captured in flight is worthless even where a caller
forgets one layer.

Every refusal is an ``AttestationRejected`` whose ``reason`` is one short code (see
``RejectionReason``); its message never quotes the token or the verdict, and nothing here
logs them, because a verdict describes a person's device.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, TypeVar

import orjson
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap

_T = TypeVar("_T")

PLAY_INTEGRITY = "play_integrity"
MEETS_DEVICE_INTEGRITY = "MEETS_DEVICE_INTEGRITY"
PLAY_RECOGNIZED = "PLAY_RECOGNIZED"
# Google's clock and ours differ a little; a verdict this far ahead of us is still believed.
FUTURE_SKEW_S = 60.0
# Real tokens are a few kilobytes; anything far larger is refused before any work is done.
MAX_TOKEN_CHARS = 64 * 1024

RejectionReason = Literal[
    "malformed",  # not shaped like a token or a verdict; a required field missing or ill-typed
    "bad_encryption",  # not A256KW/A256GCM, or does not decrypt with our key
    "bad_signature",  # not ES256, or not signed by Google's verification key
    "wrong_package",  # a verdict for another app
    "app_not_recognized",  # Play does not recognise this build of the app
    "wrong_certificate",  # the app is signed with a certificate we do not know
    "nonce_mismatch",  # a nonce not issued to this device (or no longer remembered)
    "nonce_expired",  # a nonce issued to this device, but too long ago
    "stale",  # a verdict too old, or too far in the future
    "integrity_not_met",  # the device lacks MEETS_DEVICE_INTEGRITY
    "replayed",  # a nonce or a verdict already used
]


class AttestationRejected(Exception):
    """An attestation that does not prove what it must.

    ``reason`` is a short machine code that callers map to their own error codes; the
    message is for people and never contains the token or the verdict.
    """

    def __init__(self, reason: RejectionReason, message: str) -> None:
        super().__init__(message)
        self.reason: RejectionReason = reason


@dataclass(frozen=True, slots=True)
class Attestation:
    """What a verified attestation proves about one device."""

    kind: str
    device_id: str
    verdicts: tuple[str, ...]  # the device's labels, e.g. ("MEETS_DEVICE_INTEGRITY",)
    package_name: str
    issued_at: datetime  # when the attesting service made the verdict (aware, UTC)


class Verifier(Protocol):
    """One kind of attestation; the gateway holds one and routes submissions of its kind."""

    kind: str

    def verify(
        self, token: str, *, device_id: str, nonce: str, now: datetime | None = None
    ) -> Attestation: ...


# -- nonces ---------------------------------------------------------------------------------


@dataclass(slots=True)
class _IssuedNonce:
    device_id: str
    expires_at: float
    spent: bool = False


class NonceBook:
    """Single-use nonces bound to a device, valid for ``ttl_s``, in bounded memory.

    A nonce is remembered for a further ``ttl_s`` after it expires, so that a late or
    repeated attempt is told "nonce_expired" or "replayed" rather than "nonce_mismatch".
    Forgetting a nonce early (past ``per_device`` or ``capacity``) can only turn an
    acceptance into a refusal, never the reverse, which is why the bounds are safe.

    ``clock`` must not go backwards (``time.monotonic`` by default): entries are kept in
    issue order, which is then also expiry order, so pruning only looks at the front.
    """

    def __init__(
        self,
        ttl_s: float = 600.0,
        per_device: int = 8,
        capacity: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl_s <= 0 or per_device < 1 or capacity < 1:
            raise ValueError("ttl_s, per_device and capacity must be positive")
        self.ttl_s = ttl_s
        self._per_device = per_device
        self._capacity = capacity
        self._clock = clock
        self._nonces: OrderedDict[str, _IssuedNonce] = OrderedDict()  # oldest first
        self._by_device: dict[str, OrderedDict[str, None]] = {}  # oldest first

    def __len__(self) -> int:
        """How many nonces are remembered: outstanding, spent or recently expired."""
        return len(self._nonces)

    def issue(self, device_id: str) -> str:
        """A fresh nonce for ``device_id``; its oldest beyond ``per_device`` lapse."""
        now = self._clock()
        self._prune(now)
        # 32 random bytes as base64url without padding: 43 characters, inside the
        # 16..500 web-safe, no-wrap form that Play Integrity asks for.
        nonce = base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()
        self._nonces[nonce] = _IssuedNonce(device_id, now + self.ttl_s)
        mine = self._by_device.setdefault(device_id, OrderedDict())
        mine[nonce] = None
        while len(mine) > self._per_device:
            self._forget(next(iter(mine)))
        while len(self._nonces) > self._capacity:
            self._forget(next(iter(self._nonces)))
        return nonce

    def consume(self, device_id: str, nonce: str) -> None:
        """Spends ``nonce`` for ``device_id``, once; raises ``AttestationRejected`` otherwise.

        Another device's nonce is refused without being spent, so a leaked nonce cannot be
        used to lock its owner out.
        """
        now = self._clock()
        self._prune(now)
        entry = self._nonces.get(nonce.rstrip("="))
        if entry is None or entry.device_id != device_id:
            raise AttestationRejected(
                "nonce_mismatch", "the nonce was not issued to this device, or has lapsed"
            )
        if entry.spent:
            raise AttestationRejected("replayed", "the nonce was already used")
        if entry.expires_at <= now:
            raise AttestationRejected("nonce_expired", "the nonce has expired; ask for a new one")
        entry.spent = True

    def _prune(self, now: float) -> None:
        while self._nonces:
            nonce, entry = next(iter(self._nonces.items()))
            if entry.expires_at + self.ttl_s > now:
                break
            self._forget(nonce)

    def _forget(self, nonce: str) -> None:
        entry = self._nonces.pop(nonce)
        mine = self._by_device[entry.device_id]
        del mine[nonce]
        if not mine:
            del self._by_device[entry.device_id]


# -- Play Integrity -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Verdict:
    """The fields of a classic Play Integrity verdict that the checks read."""

    request_package: str
    nonce: str
    timestamp_ms: int
    app_recognition: str
    app_package: str | None  # absent when Play did not evaluate the app
    certificate_digests: tuple[str, ...]
    device_labels: tuple[str, ...]


class PlayIntegrityVerifier:
    """Verifies classic Play Integrity tokens locally, with the keys from the Play Console.

    Decrypting locally (rather than calling Google's ``decodeIntegrityToken``) keeps the
    gateway free of Google credentials and outbound calls; the price is holding the two
    keys, which ``from_config`` reads from settings.

    Accepted verdicts are remembered until they would be stale anyway, keyed by the digest
    of the signed content (not of the token), so the same verdict re-encrypted is still
    refused. The memory holds at most ``replay_capacity`` verdicts; Play's quota on classic
    requests keeps real traffic far below that within one ``max_age_s`` window.

    Not thread-safe: the gateway calls it from its event loop.
    """

    kind = PLAY_INTEGRITY

    def __init__(
        self,
        decryption_key: bytes,
        verification_key: ec.EllipticCurvePublicKey,
        package_name: str,
        certificate_sha256_digests: Iterable[str],
        max_age_s: float = 300.0,
        replay_capacity: int = 100_000,
    ) -> None:
        if len(decryption_key) != 32:
            raise ValueError("the Play Integrity decryption key must be 32 bytes (AES-256)")
        if not isinstance(verification_key.curve, ec.SECP256R1):
            raise ValueError("the Play Integrity verification key must be EC P-256")
        if not package_name:
            raise ValueError("the app's package name is required")
        if isinstance(certificate_sha256_digests, str):
            raise TypeError("certificate_sha256_digests is a collection of digests, not one")
        digests = frozenset(_certificate_digest(d) for d in certificate_sha256_digests)
        if not digests:
            raise ValueError("at least one signing certificate digest is required")
        if max_age_s <= 0 or replay_capacity < 1:
            raise ValueError("max_age_s and replay_capacity must be positive")
        self._decryption_key = decryption_key
        self._verification_key = verification_key
        self.package_name = package_name
        self._certificate_digests = digests
        self._max_age_s = max_age_s
        self._replay_capacity = replay_capacity
        self._accepted: OrderedDict[bytes, float] = OrderedDict()  # digest → forget after

    @classmethod
    def from_config(
        cls,
        decryption_key_b64: str,
        verification_key_b64: str,
        package_name: str,
        certificate_digests: Iterable[str],
        max_age_s: float = 300.0,
    ) -> PlayIntegrityVerifier:
        """From settings as the Play Console gives them: the AES decryption key and the DER
        (SubjectPublicKeyInfo) verification key, both base64; the certificate digests as
        base64url (the form verdicts carry) or as the console's colon-separated hex."""
        try:
            public = serialization.load_der_public_key(_config_b64(verification_key_b64))
        except ValueError as exc:
            raise ValueError("the Play Integrity verification key is not a DER public key") from exc
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise ValueError("the Play Integrity verification key is not an EC key")
        return cls(
            _config_b64(decryption_key_b64),
            public,
            package_name,
            certificate_digests,
            max_age_s=max_age_s,
        )

    def verify(
        self, token: str, *, device_id: str, nonce: str, now: datetime | None = None
    ) -> Attestation:
        """The attestation ``token`` proves for ``device_id`` over ``nonce``.

        ``now`` (timezone-aware) is when the token is judged; the current time by default.
        """
        if now is None:
            now = datetime.now(UTC)
        elif now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        now_s = now.timestamp()
        signed, payload = self._open_jws(self._open_jwe(token))
        verdict_id = hashlib.sha256(signed).digest()
        self._forget_accepted(now_s)
        if verdict_id in self._accepted:
            raise AttestationRejected("replayed", "this integrity verdict was already used")
        verdict = _read_verdict(payload)
        self._check(verdict, nonce, now_s)
        # A verdict is refused as stale from issued + max_age on; remembering it until then
        # is enough.
        self._accepted[verdict_id] = verdict.timestamp_ms / 1000 + self._max_age_s
        while len(self._accepted) > self._replay_capacity:
            self._accepted.popitem(last=False)
        return Attestation(
            kind=PLAY_INTEGRITY,
            device_id=device_id,
            verdicts=verdict.device_labels,
            package_name=self.package_name,
            issued_at=datetime.fromtimestamp(verdict.timestamp_ms / 1000, UTC),
        )

    def _open_jwe(self, token: str) -> bytes:
        token = token.strip()
        if len(token) > MAX_TOKEN_CHARS:
            raise AttestationRejected("malformed", "the token is far too long")
        parts = token.split(".")
        if len(parts) != 5:
            raise AttestationRejected("malformed", "the token is not a compact JWE")
        protected, wrapped_key, iv, ciphertext, tag = (_b64url_decode(part) for part in parts)
        header = _json_object(protected, "the JWE header")
        if header.get("alg") != "A256KW" or header.get("enc") != "A256GCM":
            raise AttestationRejected("bad_encryption", "the JWE must be A256KW with A256GCM")
        if "zip" in header or "crit" in header:
            raise AttestationRejected("bad_encryption", "the JWE uses an unsupported extension")
        # RFC 7518: a 256-bit key wraps to 40 bytes; GCM here has a 96-bit IV, 128-bit tag.
        if len(wrapped_key) != 40 or len(iv) != 12 or len(tag) != 16:
            raise AttestationRejected(
                "bad_encryption", "the JWE's key, IV or tag has the wrong size"
            )
        try:
            content_key = aes_key_unwrap(self._decryption_key, wrapped_key)
            # The AAD is the header exactly as received, so re-encoding it breaks the tag.
            return AESGCM(content_key).decrypt(iv, ciphertext + tag, parts[0].encode("ascii"))
        except (InvalidUnwrap, InvalidTag) as exc:
            raise AttestationRejected("bad_encryption", "the token could not be decrypted") from exc

    def _open_jws(self, jws: bytes) -> tuple[bytes, dict[str, Any]]:
        """The signed content and the payload of a JWS signed by Google."""
        try:
            text = jws.decode("ascii")
        except UnicodeDecodeError as exc:
            raise AttestationRejected("malformed", "the decrypted token is not a JWS") from exc
        parts = text.split(".")
        if len(parts) != 3:
            raise AttestationRejected("malformed", "the decrypted token is not a compact JWS")
        header = _json_object(_b64url_decode(parts[0]), "the JWS header")
        if header.get("alg") != "ES256" or "crit" in header:
            raise AttestationRejected("bad_signature", "the verdict must be signed ES256")
        signature = _b64url_decode(parts[2])
        # JWS carries ECDSA as raw r || s (RFC 7518 §3.4), not the DER that OpenSSL takes.
        if len(signature) != 64:
            raise AttestationRejected("bad_signature", "an ES256 signature is 64 bytes")
        der = encode_dss_signature(
            int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        )
        signed = f"{parts[0]}.{parts[1]}".encode("ascii")
        try:
            self._verification_key.verify(der, signed, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature as exc:
            raise AttestationRejected("bad_signature", "the verdict's signature is wrong") from exc
        return signed, _json_object(_b64url_decode(parts[1]), "the verdict")

    def _check(self, verdict: _Verdict, nonce: str, now_s: float) -> None:
        # Google's order: first that the verdict answers our request, then what it says.
        if verdict.request_package != self.package_name:
            raise AttestationRejected("wrong_package", "the verdict was requested by another app")
        if not hmac.compare_digest(_nonce_form(verdict.nonce), _nonce_form(nonce)):
            raise AttestationRejected("nonce_mismatch", "the verdict is for another nonce")
        age_s = now_s - verdict.timestamp_ms / 1000
        if age_s > self._max_age_s:
            raise AttestationRejected("stale", "the verdict is too old; attest again")
        if age_s < -FUTURE_SKEW_S:
            raise AttestationRejected("stale", "the verdict is dated in the future")
        if verdict.app_recognition != PLAY_RECOGNIZED:
            raise AttestationRejected("app_not_recognized", "Play does not recognise this app")
        if verdict.app_package != self.package_name:
            raise AttestationRejected("wrong_package", "the verdict is for another app")
        presented = {_verdict_digest(d) for d in verdict.certificate_digests}
        if not self._certificate_digests & presented:
            raise AttestationRejected(
                "wrong_certificate", "the app is not signed with a known certificate"
            )
        if MEETS_DEVICE_INTEGRITY not in verdict.device_labels:
            raise AttestationRejected(
                "integrity_not_met", "the device does not meet Play's device integrity"
            )

    def _forget_accepted(self, now_s: float) -> None:
        # Entries are in acceptance order, not strictly expiry order: stopping at the first
        # live one may keep some expired ones a while longer, but never drops a live one.
        while self._accepted:
            verdict_id, forget_after = next(iter(self._accepted.items()))
            if forget_after >= now_s:
                break
            del self._accepted[verdict_id]


def _read_verdict(payload: dict[str, Any]) -> _Verdict:
    """The fields the checks need, or "malformed" when one is missing or of the wrong type.

    ``packageName`` and ``certificateSha256Digest`` are required only of a recognised app:
    Play leaves them out when it could not evaluate the app, which is refused as
    "app_not_recognized" instead. A missing ``deviceRecognitionVerdict`` means no labels,
    as Play sends for a device that meets none.
    """
    request = _field(payload, "requestDetails", dict)
    app = _field(payload, "appIntegrity", dict)
    device = _field(payload, "deviceIntegrity", dict)
    recognition = _field(app, "appRecognitionVerdict", str)
    recognised = recognition == PLAY_RECOGNIZED
    app_package = _field(app, "packageName", str) if recognised or "packageName" in app else None
    digests: list[Any] = (
        _field(app, "certificateSha256Digest", list)
        if recognised or "certificateSha256Digest" in app
        else []
    )
    labels: list[Any] = device.get("deviceRecognitionVerdict", [])
    if not isinstance(labels, list):
        raise AttestationRejected("malformed", "deviceRecognitionVerdict is not a list")
    if not all(isinstance(item, str) for item in [*digests, *labels]):
        raise AttestationRejected("malformed", "the verdict lists something other than text")
    return _Verdict(
        request_package=_field(request, "requestPackageName", str),
        nonce=_field(request, "nonce", str),
        timestamp_ms=_millis(request.get("timestampMillis")),
        app_recognition=recognition,
        app_package=app_package,
        certificate_digests=tuple(digests),
        device_labels=tuple(labels),
    )


def _certificate_digest(text: str) -> bytes:
    """A signing certificate's SHA-256 digest from configuration: base64url or base64 (as
    verdicts carry it, padded or not) or hex (as the Play Console shows it, colons allowed)."""
    cleaned = text.strip().replace(":", "")
    if re.fullmatch(r"[0-9A-Fa-f]{64}", cleaned):
        return bytes.fromhex(cleaned)
    digest = _verdict_digest(cleaned)
    if len(digest) != 32:
        raise ValueError(f"not a SHA-256 certificate digest: {text!r}")
    return digest


def _b64url_decode(text: str) -> bytes:
    """Strict base64url, padding optional: a JOSE part with any other character is
    malformed (Python's decoder would otherwise skip stray characters silently)."""
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text) or len(text) % 4 == 1:
        raise AttestationRejected("malformed", "the token is not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _verdict_digest(text: str) -> bytes:
    """A digest as a verdict carries it; one that does not decode matches nothing."""
    try:
        return _b64url_decode(text.rstrip("=").replace("+", "-").replace("/", "_"))
    except AttestationRejected:
        return b""


def _nonce_form(nonce: str) -> bytes:
    """Play may hand the nonce back padded, or in the standard alphabet; compare the one
    base64url, unpadded form."""
    return nonce.rstrip("=").replace("+", "-").replace("/", "_").encode()


def _config_b64(text: str) -> bytes:
    """The Play Console gives standard base64; url-safe and line-wrapped copies also work."""
    cleaned = "".join(text.split()).replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(cleaned + "=" * (-len(cleaned) % 4), validate=True)
    except binascii.Error as exc:
        raise ValueError("not valid base64") from exc


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise AttestationRejected("malformed", f"{what} is not JSON") from exc
    if not isinstance(value, dict):
        raise AttestationRejected("malformed", f"{what} is not a JSON object")
    return value


def _field(section: dict[str, Any], name: str, kind: type[_T]) -> _T:
    value = section.get(name)
    if not isinstance(value, kind):
        raise AttestationRejected("malformed", f"the verdict's {name} is missing or ill-typed")
    return value


def _millis(value: object) -> int:
    """``timestampMillis`` is a decimal string in JSON (protobuf's int64); a number works too."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and 0 < len(value) <= 16 and value.isascii() and value.isdigit():
        return int(value)
    raise AttestationRejected("malformed", "the verdict's timestampMillis is missing or ill-typed")
