"""Play Integrity (classic) verification, with keys made here and tokens built the way
Google builds them: an ES256 JWS (signed with PyJWT, independently of the verifier's own
ECDSA code) inside an A256KW/A256GCM JWE."""

from __future__ import annotations

import base64
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import aes_key_wrap

from swarmgate.trust.attestation import (
    AttestationRejected,
    NonceBook,
    PlayIntegrityVerifier,
    Verifier,
)
from tests.conftest import MODEL, LiveGateway, fast_settings, start_gateway, stop_gateway

PACKAGE = "net.swarmgate.node"
CERT_DIGEST = bytes(range(32))
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
NOW_MS = int(NOW.timestamp() * 1000)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


CERT = b64url(CERT_DIGEST)
NONCE = b64url(b"n" * 32)
DROP = object()  # as a change to verdict(): remove that field or section


class FakePlayIntegrity:
    """Google's side of Play Integrity: the app's two keys, and tokens over verdicts."""

    def __init__(self) -> None:
        self.decryption_key = os.urandom(32)
        self.signing_key = ec.generate_private_key(ec.SECP256R1())

    @property
    def decryption_key_b64(self) -> str:
        return base64.b64encode(self.decryption_key).decode()

    @property
    def verification_key_b64(self) -> str:
        der = self.signing_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return base64.b64encode(der).decode()

    def verifier(self, **overrides: Any) -> PlayIntegrityVerifier:
        settings: dict[str, Any] = {
            "decryption_key_b64": self.decryption_key_b64,
            "verification_key_b64": self.verification_key_b64,
            "package_name": PACKAGE,
            "certificate_digests": [CERT],
        }
        settings.update(overrides)
        return PlayIntegrityVerifier.from_config(**settings)

    @staticmethod
    def verdict(**changes: Any) -> dict[str, Any]:
        """A passing classic verdict; ``section__field=value`` changes one field and
        ``section__field=DROP`` removes it."""
        payload: dict[str, Any] = {
            "requestDetails": {
                "requestPackageName": PACKAGE,
                "nonce": NONCE,
                "timestampMillis": str(NOW_MS - 2_000),
            },
            "appIntegrity": {
                "appRecognitionVerdict": "PLAY_RECOGNIZED",
                "packageName": PACKAGE,
                "certificateSha256Digest": [CERT],
                "versionCode": "42",
            },
            "deviceIntegrity": {"deviceRecognitionVerdict": ["MEETS_DEVICE_INTEGRITY"]},
            "accountDetails": {"appLicensingVerdict": "LICENSED"},
        }
        for path, value in changes.items():
            section, _, field = path.partition("__")
            if not field and value is DROP:
                del payload[section]
            elif not field:
                payload[section] = value
            elif value is DROP:
                del payload[section][field]
            else:
                payload[section][field] = value
        return payload

    def sign(
        self,
        payload: dict[str, Any],
        key: Any = None,
        algorithm: str = "ES256",
    ) -> str:
        return jwt.encode(payload, self.signing_key if key is None else key, algorithm=algorithm)

    def seal(self, jws: str, header: dict[str, Any] | None = None) -> str:
        protected = b64url(orjson.dumps(header or {"alg": "A256KW", "enc": "A256GCM"}))
        content_key = os.urandom(32)
        iv = os.urandom(12)
        sealed = AESGCM(content_key).encrypt(iv, jws.encode(), protected.encode())
        ciphertext, tag = sealed[:-16], sealed[-16:]
        wrapped = aes_key_wrap(self.decryption_key, content_key)
        return ".".join([protected, b64url(wrapped), b64url(iv), b64url(ciphertext), b64url(tag)])

    def token(self, payload: dict[str, Any] | None = None) -> str:
        return self.seal(self.sign(self.verdict() if payload is None else payload))


@pytest.fixture
def google() -> FakePlayIntegrity:
    return FakePlayIntegrity()


def rejection(verifier: PlayIntegrityVerifier, token: str, **kwargs: Any) -> str:
    arguments: dict[str, Any] = {"device_id": "dev", "nonce": NONCE, "now": NOW}
    arguments.update(kwargs)
    with pytest.raises(AttestationRejected) as rejected:
        verifier.verify(token, **arguments)
    # The message is for people and never repeats what the device sent.
    assert all(part not in str(rejected.value) for part in token.split(".") if len(part) > 8)
    return rejected.value.reason


# -- a valid token --------------------------------------------------------------------------


def test_a_valid_token_verifies(google: FakePlayIntegrity) -> None:
    verifier: Verifier = google.verifier()
    attestation = verifier.verify(google.token(), device_id="dev_1", nonce=NONCE, now=NOW)
    assert attestation.kind == verifier.kind == "play_integrity"
    assert attestation.device_id == "dev_1"
    assert attestation.verdicts == ("MEETS_DEVICE_INTEGRITY",)
    assert attestation.package_name == PACKAGE
    assert attestation.issued_at == NOW - timedelta(seconds=2)


@pytest.mark.parametrize(
    ("asked", "returned"),
    [
        (NONCE, NONCE + "="),
        (b64url(b"\xfb" * 32), base64.b64encode(b"\xfb" * 32).decode()),
        (base64.b64encode(b"\xfb" * 32).decode(), b64url(b"\xfb" * 32)),
    ],
    ids=["padded", "standard-alphabet-returned", "standard-alphabet-asked"],
)
def test_the_nonce_matches_padded_or_in_either_alphabet(
    google: FakePlayIntegrity, asked: str, returned: str
) -> None:
    token = google.token(google.verdict(requestDetails__nonce=returned))
    google.verifier().verify(token, device_id="dev", nonce=asked, now=NOW)


def test_verdicts_at_the_edges_of_the_time_window_verify(google: FakePlayIntegrity) -> None:
    verifier = google.verifier(max_age_s=300)
    for at in (NOW_MS - 300_000, NOW_MS + 60_000, NOW_MS):
        token = google.token(google.verdict(requestDetails__timestampMillis=str(at)))
        verifier.verify(token, device_id="dev", nonce=NONCE, now=NOW)
    numeric = google.token(google.verdict(requestDetails__timestampMillis=NOW_MS - 1))
    verifier.verify(numeric, device_id="dev", nonce=NONCE, now=NOW)


def test_config_accepts_console_forms_of_the_keys_and_digests(google: FakePlayIntegrity) -> None:
    console_hex = ":".join(f"{b:02X}" for b in CERT_DIGEST)
    wrapped_key = google.verification_key_b64
    wrapped_key = "\n".join(wrapped_key[i : i + 64] for i in range(0, len(wrapped_key), 64))
    for digest in (console_hex, CERT + "=", base64.b64encode(CERT_DIGEST).decode()):
        verifier = google.verifier(certificate_digests=[digest], verification_key_b64=wrapped_key)
        verifier.verify(google.token(), device_id="dev", nonce=NONCE, now=NOW)


# -- each check and its reason --------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"requestDetails__requestPackageName": "com.evil"}, "wrong_package"),
        ({"appIntegrity__packageName": "com.evil"}, "wrong_package"),
        ({"appIntegrity__certificateSha256Digest": [b64url(b"\x02" * 32)]}, "wrong_certificate"),
        ({"appIntegrity__certificateSha256Digest": []}, "wrong_certificate"),
        ({"appIntegrity__certificateSha256Digest": ["not base64!"]}, "wrong_certificate"),
        ({"appIntegrity__appRecognitionVerdict": "UNRECOGNIZED_VERSION"}, "app_not_recognized"),
        ({"appIntegrity": {"appRecognitionVerdict": "UNEVALUATED"}}, "app_not_recognized"),
        ({"requestDetails__nonce": b64url(b"m" * 32)}, "nonce_mismatch"),
        ({"requestDetails__timestampMillis": str(NOW_MS - 300_001)}, "stale"),
        ({"requestDetails__timestampMillis": str(NOW_MS + 60_001)}, "stale"),
        (
            {"deviceIntegrity__deviceRecognitionVerdict": ["MEETS_BASIC_INTEGRITY"]},
            "integrity_not_met",
        ),
        ({"deviceIntegrity__deviceRecognitionVerdict": []}, "integrity_not_met"),
        ({"deviceIntegrity__deviceRecognitionVerdict": DROP}, "integrity_not_met"),
        ({"requestDetails__timestampMillis": "soon"}, "malformed"),
        ({"requestDetails__timestampMillis": True}, "malformed"),
        ({"requestDetails__timestampMillis": DROP}, "malformed"),
        ({"requestDetails__nonce": 12345}, "malformed"),
        ({"requestDetails__requestPackageName": DROP}, "malformed"),
        ({"requestDetails": DROP}, "malformed"),
        ({"appIntegrity": "PLAY_RECOGNIZED"}, "malformed"),
        ({"appIntegrity__packageName": DROP}, "malformed"),
        ({"appIntegrity__certificateSha256Digest": CERT}, "malformed"),
        ({"deviceIntegrity__deviceRecognitionVerdict": "MEETS_DEVICE_INTEGRITY"}, "malformed"),
        ({"deviceIntegrity__deviceRecognitionVerdict": [1]}, "malformed"),
        ({"deviceIntegrity": DROP}, "malformed"),
    ],
)
def test_each_check_rejects_with_its_reason(
    google: FakePlayIntegrity, changes: dict[str, Any], reason: str
) -> None:
    token = google.token(google.verdict(**changes))
    assert rejection(google.verifier(), token) == reason


def test_the_nonce_given_must_be_the_one_in_the_verdict(google: FakePlayIntegrity) -> None:
    token = google.token()
    assert rejection(google.verifier(), token, nonce=b64url(b"x" * 32)) == "nonce_mismatch"


def test_a_naive_now_is_a_programming_error(google: FakePlayIntegrity) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        google.verifier().verify(
            google.token(), device_id="dev", nonce=NONCE, now=NOW.replace(tzinfo=None)
        )


# -- the envelope: signature and encryption -------------------------------------------------


def test_a_verdict_signed_by_another_key_is_refused(google: FakePlayIntegrity) -> None:
    forger = ec.generate_private_key(ec.SECP256R1())
    token = google.seal(google.sign(google.verdict(), key=forger))
    assert rejection(google.verifier(), token) == "bad_signature"


@pytest.mark.parametrize(
    ("key", "algorithm"),
    [(b"k" * 32, "HS256"), (None, "none"), ("P-384", "ES384")],
    ids=["hmac", "unsigned", "es384"],
)
def test_a_verdict_signed_another_way_is_refused(
    google: FakePlayIntegrity, key: Any, algorithm: str
) -> None:
    if key == "P-384":
        key = ec.generate_private_key(ec.SECP384R1())
    jws = jwt.encode(google.verdict(), key, algorithm=algorithm)
    assert rejection(google.verifier(), google.seal(jws)) == "bad_signature"


@pytest.mark.parametrize(
    "header",
    [{"alg": "ES384"}, {"alg": "ES256", "crit": ["b64"], "b64": False}, {"typ": "JWT"}],
    ids=["other-alg", "critical-extension", "no-alg"],
)
def test_only_a_plain_es256_header_is_trusted(
    google: FakePlayIntegrity, header: dict[str, Any]
) -> None:
    # A genuine P-256 signature, under a header that claims something we must not accept.
    signing_input = f"{b64url(orjson.dumps(header))}.{b64url(orjson.dumps(google.verdict()))}"
    der = google.signing_key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    jws = f"{signing_input}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"
    assert rejection(google.verifier(), google.seal(jws)) == "bad_signature"


def test_a_tampered_verdict_is_refused(google: FakePlayIntegrity) -> None:
    header, payload, signature = google.sign(google.verdict()).split(".")
    forged = google.verdict(deviceIntegrity__deviceRecognitionVerdict=["MEETS_STRONG_INTEGRITY"])
    swapped = ".".join([header, b64url(orjson.dumps(forged)), signature])
    assert rejection(google.verifier(), google.seal(swapped)) == "bad_signature"
    short = ".".join([header, payload, b64url(unb64url(signature)[:63])])
    assert rejection(google.verifier(), google.seal(short)) == "bad_signature"


@pytest.mark.parametrize("index", [1, 2, 3, 4], ids=["wrapped-key", "iv", "ciphertext", "tag"])
def test_a_tampered_jwe_is_refused(google: FakePlayIntegrity, index: int) -> None:
    parts = google.token().split(".")
    flipped = bytearray(unb64url(parts[index]))
    flipped[0] ^= 1
    parts[index] = b64url(bytes(flipped))
    assert rejection(google.verifier(), ".".join(parts)) == "bad_encryption"


def test_the_header_is_authenticated_as_received(google: FakePlayIntegrity) -> None:
    parts = google.token().split(".")
    # The same header, spelled differently: a different AAD, so the tag no longer fits.
    parts[0] = b64url(b'{"enc":"A256GCM","alg":"A256KW"}')
    assert rejection(google.verifier(), ".".join(parts)) == "bad_encryption"


@pytest.mark.parametrize(
    "header",
    [
        {"alg": "dir", "enc": "A256GCM"},
        {"alg": "RSA-OAEP-256", "enc": "A256GCM"},
        {"alg": "A128KW", "enc": "A256GCM"},
        {"alg": "A256KW", "enc": "A128GCM"},
        {"alg": "A256KW", "enc": "A256CBC-HS512"},
        {"alg": "A256KW"},
        {"alg": "A256KW", "enc": "A256GCM", "zip": "DEF"},
    ],
)
def test_other_jwe_algorithms_are_refused(
    google: FakePlayIntegrity, header: dict[str, Any]
) -> None:
    token = google.seal(google.sign(google.verdict()), header=header)
    assert rejection(google.verifier(), token) == "bad_encryption"


def test_a_token_for_another_apps_keys_is_refused(google: FakePlayIntegrity) -> None:
    assert rejection(google.verifier(), FakePlayIntegrity().token()) == "bad_encryption"


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "not.a.token",
        "a.b.c.d.e",
        "e30.!!!.AAAA.AAAA.AAAA",
        "W10.AAAA.AAAA.AAAA.AAAA",  # the header is JSON, but not an object
        "x" * 70_000,
    ],
)
def test_garbage_is_malformed(google: FakePlayIntegrity, token: str) -> None:
    assert rejection(google.verifier(), token) == "malformed"


def test_a_jwe_around_something_other_than_a_jws_is_malformed(google: FakePlayIntegrity) -> None:
    assert rejection(google.verifier(), google.seal("just text")) == "malformed"
    assert rejection(google.verifier(), google.seal("é.é.é")) == "malformed"
    # Properly signed, but the payload is a JSON array rather than a verdict.
    not_an_object = jwt.api_jws.encode(b"[1, 2]", google.signing_key, algorithm="ES256")
    assert rejection(google.verifier(), google.seal(not_an_object)) == "malformed"


# -- replays --------------------------------------------------------------------------------


def test_a_token_is_accepted_once(google: FakePlayIntegrity) -> None:
    verifier = google.verifier()
    token = google.token()
    verifier.verify(token, device_id="dev", nonce=NONCE, now=NOW)
    assert rejection(verifier, token) == "replayed"
    assert rejection(verifier, token, now=NOW + timedelta(seconds=10)) == "replayed"


def test_the_same_verdict_re_encrypted_is_still_a_replay(google: FakePlayIntegrity) -> None:
    verifier = google.verifier()
    jws = google.sign(google.verdict())
    verifier.verify(google.seal(jws), device_id="dev", nonce=NONCE, now=NOW)
    assert rejection(verifier, google.seal(jws)) == "replayed"


def test_a_refused_token_is_not_spent(google: FakePlayIntegrity) -> None:
    verifier = google.verifier()
    token = google.token()
    assert rejection(verifier, token, nonce=b64url(b"x" * 32)) == "nonce_mismatch"
    verifier.verify(token, device_id="dev", nonce=NONCE, now=NOW)


def test_accepted_verdicts_are_forgotten_once_they_would_be_stale(
    google: FakePlayIntegrity,
) -> None:
    verifier = google.verifier(max_age_s=300)
    first = google.token()
    verifier.verify(first, device_id="dev", nonce=NONCE, now=NOW)
    later = NOW + timedelta(seconds=400)
    fresh = google.verdict(requestDetails__timestampMillis=str(int(later.timestamp() * 1000)))
    verifier.verify(google.token(fresh), device_id="dev", nonce=NONCE, now=later)
    assert len(verifier._accepted) == 1  # the first is past its window and was dropped
    assert rejection(verifier, first, now=later) == "stale"


# -- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"decryption_key_b64": base64.b64encode(b"k" * 16).decode()}, "32 bytes"),
        ({"decryption_key_b64": "not base64 at all!"}, "base64"),
        ({"verification_key_b64": base64.b64encode(b"not DER").decode()}, "DER"),
        ({"certificate_digests": []}, "at least one"),
        ({"certificate_digests": ["abcd"]}, "SHA-256"),
        ({"package_name": ""}, "package"),
        ({"max_age_s": 0}, "positive"),
    ],
)
def test_bad_configuration_is_refused_at_start(
    google: FakePlayIntegrity, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        google.verifier(**overrides)


def test_the_verification_key_must_be_ec_p256(google: FakePlayIntegrity) -> None:
    rsa_der = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(ValueError, match="EC"):
        google.verifier(verification_key_b64=base64.b64encode(rsa_der).decode())
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    with pytest.raises(ValueError, match="P-256"):
        PlayIntegrityVerifier(google.decryption_key, p384, PACKAGE, frozenset([CERT]))
    with pytest.raises(TypeError):
        PlayIntegrityVerifier(google.decryption_key, google.signing_key.public_key(), PACKAGE, CERT)


# -- nonces ---------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def test_nonces_are_web_safe_long_enough_and_unique() -> None:
    book = NonceBook()
    nonces = {book.issue("dev") for _ in range(8)}
    assert len(nonces) == 8
    for nonce in nonces:
        assert 16 <= len(nonce) <= 500
        assert len(unb64url(nonce)) >= 24
        assert set(nonce) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def test_a_nonce_is_spent_once() -> None:
    book = NonceBook(clock=Clock())
    nonce = book.issue("dev")
    book.consume("dev", nonce)
    with pytest.raises(AttestationRejected) as again:
        book.consume("dev", nonce)
    assert again.value.reason == "replayed"


def test_a_nonce_is_bound_to_its_device() -> None:
    book = NonceBook(clock=Clock())
    nonce = book.issue("dev_a")
    with pytest.raises(AttestationRejected) as elsewhere:
        book.consume("dev_b", nonce)
    assert elsewhere.value.reason == "nonce_mismatch"
    book.consume("dev_a", nonce)  # another device's attempt did not spend it


def test_unknown_nonces_are_refused() -> None:
    book = NonceBook(clock=Clock())
    book.issue("dev")
    with pytest.raises(AttestationRejected) as unknown:
        book.consume("dev", b64url(os.urandom(32)))
    assert unknown.value.reason == "nonce_mismatch"


def test_a_padded_nonce_is_the_same_nonce() -> None:
    book = NonceBook(clock=Clock())
    nonce = book.issue("dev")
    book.consume("dev", nonce + "=")


def test_nonces_expire_and_are_then_forgotten() -> None:
    clock = Clock()
    book = NonceBook(ttl_s=60, clock=clock)
    nonce = book.issue("dev")
    clock.now += 59.9
    spent = book.issue("dev")
    book.consume("dev", spent)
    clock.now += 0.2
    with pytest.raises(AttestationRejected) as expired:
        book.consume("dev", nonce)
    assert expired.value.reason == "nonce_expired"
    clock.now += 60
    book.issue("other")
    assert len(book) == 2  # the first is gone; the spent one stays until its own end
    with pytest.raises(AttestationRejected) as forgotten:
        book.consume("dev", nonce)
    assert forgotten.value.reason == "nonce_mismatch"
    with pytest.raises(AttestationRejected) as replayed:
        book.consume("dev", spent)
    assert replayed.value.reason == "replayed"
    clock.now += 60
    book.issue("other")
    assert len(book) == 2  # now both of "other"'s


def test_outstanding_nonces_are_bounded_per_device() -> None:
    book = NonceBook(per_device=3, clock=Clock())
    first, *rest = [book.issue("dev") for _ in range(4)]
    neighbour = book.issue("other")
    assert len(book) == 4
    with pytest.raises(AttestationRejected) as lapsed:
        book.consume("dev", first)
    assert lapsed.value.reason == "nonce_mismatch"
    for nonce in rest:
        book.consume("dev", nonce)
    book.consume("other", neighbour)


def test_the_whole_book_is_bounded() -> None:
    book = NonceBook(capacity=5, clock=Clock())
    nonces = [book.issue(f"dev_{i}") for i in range(7)]
    assert len(book) == 5
    with pytest.raises(AttestationRejected):
        book.consume("dev_0", nonces[0])
    book.consume("dev_6", nonces[6])


# -- through the API ------------------------------------------------------------------------


async def test_a_device_attests_over_the_api_and_serves_verified_requests(
    tmp_path: Path, google: FakePlayIntegrity
) -> None:
    live: LiveGateway = await start_gateway(
        fast_settings(
            tmp_path,
            play_integrity_package=PACKAGE,
            play_integrity_decryption_key=google.decryption_key_b64,
            play_integrity_verification_key=google.verification_key_b64,
            play_integrity_certificate_digests=[CERT],
        )
    )
    try:
        device_id, token = await live.device_token()
        await live.add_sim_device(token=token)
        _, key = await live.developer_key()
        chat = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "privacyLevel": "verified",
        }
        async with live.client(key) as client:
            before = await client.post("/v1/chat/completions", json=chat)
        assert before.json()["error"]["code"] == "NO_VERIFIED_DEVICE"
        async with live.client(token) as device:
            issued = (await device.post("/v1/nodes/attestation/nonce")).json()
            assert issued["kind"] == "play_integrity"
            nonce = issued["nonce"]
            now_ms = str(int(datetime.now(UTC).timestamp() * 1000))
            wrong = google.verdict(requestDetails__timestampMillis=now_ms)
            refused = await device.post(
                "/v1/nodes/attestation", json={"nonce": nonce, "token": google.token(wrong)}
            )
            assert refused.status_code == 403
            assert refused.json()["error"]["code"] == "ATTESTATION_NONCE_MISMATCH"
            # That attempt spent the nonce: a new one is needed.
            nonce = (await device.post("/v1/nodes/attestation/nonce")).json()["nonce"]
            verdict = google.verdict(
                requestDetails__nonce=nonce, requestDetails__timestampMillis=now_ms
            )
            accepted = await device.post(
                "/v1/nodes/attestation", json={"nonce": nonce, "token": google.token(verdict)}
            )
            assert accepted.status_code == 200, accepted.text
            assert accepted.json()["verified"] is True
            assert accepted.json()["verified_by"] == "play_integrity"
            assert accepted.json()["verdicts"] == ["MEETS_DEVICE_INTEGRITY"]
            replay = await device.post(
                "/v1/nodes/attestation", json={"nonce": nonce, "token": google.token(verdict)}
            )
            assert replay.status_code == 403
            assert replay.json()["error"]["code"] == "ATTESTATION_REPLAYED"
        async with live.client(key) as client:
            after = await client.post("/v1/chat/completions", json=chat)
        assert after.status_code == 200, after.text
        assert after.json()["swarmgate"]["device_id"] == device_id
        # A verdict counts for a while; then the device must attest again.
        book = live.gateway.trust
        assert book.expire_attestations(datetime.now(UTC).timestamp()) == []
        later = datetime.now(UTC).timestamp() + live.settings.attestation_valid_s + 1
        assert book.expire_attestations(later) == [device_id]
        async with live.client(key) as client:
            expired = await client.post("/v1/chat/completions", json=chat)
        assert expired.json()["error"]["code"] == "NO_VERIFIED_DEVICE"
    finally:
        await stop_gateway(live)


async def test_attestation_is_off_unless_configured(live: LiveGateway) -> None:
    _device_id, token = await live.device_token()
    async with live.client(token) as device:
        response = await device.post("/v1/nodes/attestation/nonce")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "ATTESTATION_NOT_CONFIGURED"
