"""Play Integrity (classic) verification with keys and tokens made here the way Google makes
them: an ES256 JWS inside an A256KW/A256GCM JWE."""

from __future__ import annotations

import base64
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import aes_key_wrap

from swarmgate.trust.attestation import (
    AttestationRejected,
    NonceBook,
    PlayIntegrityVerifier,
)
from tests.conftest import MODEL, LiveGateway, fast_settings, start_gateway, stop_gateway

PACKAGE = "net.swarmgate.node"
CERT = base64.urlsafe_b64encode(b"\x01" * 32).rstrip(b"=").decode()
NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
NONCE = base64.urlsafe_b64encode(b"n" * 32).rstrip(b"=").decode()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Google:
    """Signs and encrypts verdicts as Play Integrity does, with keys made for the test."""

    def __init__(self) -> None:
        self.aes_key = os.urandom(32)
        self.signing_key = ec.generate_private_key(ec.SECP256R1())

    def public_der_b64(self) -> str:
        der = self.signing_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return base64.b64encode(der).decode()

    def verdict(self, **changes: Any) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "requestDetails": {
                "requestPackageName": PACKAGE,
                "nonce": NONCE,
                "timestampMillis": str(int(NOW.timestamp() * 1000) - 2_000),
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
            section, field = path.split("__")
            payload[section][field] = value
        return payload

    def token(
        self,
        payload: dict[str, Any],
        signer: ec.EllipticCurvePrivateKey | None = None,
        header: dict[str, str] | None = None,
    ) -> str:
        signer = signer or self.signing_key
        signing_input = b64(orjson.dumps({"alg": "ES256"})) + "." + b64(orjson.dumps(payload))
        der = signer.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        jws = signing_input + "." + b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))
        protected = b64(orjson.dumps(header or {"alg": "A256KW", "enc": "A256GCM"}))
        cek = os.urandom(32)
        iv = os.urandom(12)
        sealed = AESGCM(cek).encrypt(iv, jws.encode(), protected.encode())
        ciphertext, tag = sealed[:-16], sealed[-16:]
        wrapped = aes_key_wrap(self.aes_key, cek)
        return ".".join([protected, b64(wrapped), b64(iv), b64(ciphertext), b64(tag)])

    def verifier(self) -> PlayIntegrityVerifier:
        return PlayIntegrityVerifier.from_config(
            decryption_key_b64=base64.b64encode(self.aes_key).decode(),
            verification_key_b64=self.public_der_b64(),
            package_name=PACKAGE,
            certificate_digests=[CERT],
        )


@pytest.fixture
def google() -> Google:
    return Google()


def test_a_valid_token_verifies(google: Google) -> None:
    verified = google.verifier().verify(
        google.token(google.verdict()), device_id="dev_1", nonce=NONCE, now=NOW
    )
    assert verified.kind == "play_integrity" and verified.device_id == "dev_1"
    assert "MEETS_DEVICE_INTEGRITY" in verified.verdicts
    assert verified.issued_at == NOW - timedelta(seconds=2)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"requestDetails__requestPackageName": "com.evil"}, "wrong_package"),
        ({"appIntegrity__packageName": "com.evil"}, "wrong_package"),
        ({"appIntegrity__certificateSha256Digest": [b64(b"\x02" * 32)]}, "wrong_certificate"),
        ({"appIntegrity__appRecognitionVerdict": "UNRECOGNIZED_VERSION"}, "app_not_recognized"),
        ({"requestDetails__nonce": b64(b"m" * 32)}, "nonce_mismatch"),
        (
            {"requestDetails__timestampMillis": str(int(NOW.timestamp() * 1000) - 600_000)},
            "stale",
        ),
        (
            {"requestDetails__timestampMillis": str(int(NOW.timestamp() * 1000) + 120_000)},
            "stale",
        ),
        (
            {"deviceIntegrity__deviceRecognitionVerdict": ["MEETS_BASIC_INTEGRITY"]},
            "integrity_not_met",
        ),
        ({"deviceIntegrity__deviceRecognitionVerdict": []}, "integrity_not_met"),
        ({"requestDetails__timestampMillis": "soon"}, "malformed"),
    ],
)
def test_each_check_rejects_with_its_reason(
    google: Google, changes: dict[str, Any], reason: str
) -> None:
    token = google.token(google.verdict(**changes))
    with pytest.raises(AttestationRejected) as rejected:
        google.verifier().verify(token, device_id="d", nonce=NONCE, now=NOW)
    assert rejected.value.reason == reason


def test_forged_tampered_and_garbled_tokens_are_rejected(google: Google) -> None:
    verifier = google.verifier()

    def reason(token: str) -> str:
        with pytest.raises(AttestationRejected) as rejected:
            verifier.verify(token, device_id="d", nonce=NONCE, now=NOW)
        return rejected.value.reason

    forger = ec.generate_private_key(ec.SECP256R1())
    assert reason(google.token(google.verdict(), signer=forger)) == "bad_signature"
    parts = google.token(google.verdict()).split(".")
    flipped = bytearray(base64.urlsafe_b64decode(parts[3] + "=" * (-len(parts[3]) % 4)))
    flipped[0] ^= 1
    parts[3] = b64(bytes(flipped))
    assert reason(".".join(parts)) == "bad_encryption"
    assert reason(google.token(google.verdict(), header={"alg": "dir", "enc": "A256GCM"})) == (
        "bad_encryption"
    )
    assert reason(google.token(google.verdict(), header={"alg": "A256KW", "enc": "A128GCM"})) == (
        "bad_encryption"
    )
    other_key = Google()
    assert reason(other_key.token(google.verdict())) == "bad_encryption"
    assert reason("not.a.token") == "malformed"
    assert reason("a.b.c.d.e") == "malformed"


def test_a_token_is_accepted_once(google: Google) -> None:
    verifier = google.verifier()
    token = google.token(google.verdict())
    verifier.verify(token, device_id="d", nonce=NONCE, now=NOW)
    with pytest.raises(AttestationRejected) as again:
        verifier.verify(token, device_id="d", nonce=NONCE, now=NOW)
    assert again.value.reason == "replayed"


def test_nonces_are_single_use_per_device_and_expire() -> None:
    clock = [100.0]
    book = NonceBook(ttl_s=60, per_device=3, clock=lambda: clock[0])
    nonce = book.issue("a")
    assert 16 <= len(nonce) <= 500 and "=" not in nonce
    with pytest.raises(AttestationRejected, match="not issued"):
        book.consume("b", nonce)  # another device's nonce
    book.consume("a", nonce)
    with pytest.raises(AttestationRejected) as used:
        book.consume("a", nonce)
    assert used.value.reason == "nonce_mismatch"
    late = book.issue("a")
    clock[0] += 61
    with pytest.raises(AttestationRejected) as expired:
        book.consume("a", late)
    assert expired.value.reason == "nonce_expired"
    first, *rest = [book.issue("a") for _ in range(4)]
    with pytest.raises(AttestationRejected):
        book.consume("a", first)  # only the newest 3 stay outstanding
    for nonce in rest:
        book.consume("a", nonce)


async def test_a_device_attests_over_the_api_and_serves_verified_requests(
    tmp_path: Path, google: Google
) -> None:
    live: LiveGateway = await start_gateway(
        fast_settings(
            tmp_path,
            play_integrity_package=PACKAGE,
            play_integrity_decryption_key=base64.b64encode(google.aes_key).decode(),
            play_integrity_verification_key=google.public_der_b64(),
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
            now_ms = int(datetime.now(UTC).timestamp() * 1000)
            verdict = google.verdict(
                requestDetails__nonce=nonce, requestDetails__timestampMillis=str(now_ms)
            )
            wrong = google.verdict(requestDetails__timestampMillis=str(now_ms))
            refused = await device.post(
                "/v1/nodes/attestation", json={"nonce": nonce, "token": google.token(wrong)}
            )
            assert refused.status_code == 403
            assert refused.json()["error"]["code"] == "ATTESTATION_NONCE_MISMATCH"
            # The nonce was spent by that attempt: a new one is needed.
            nonce = (await device.post("/v1/nodes/attestation/nonce")).json()["nonce"]
            verdict["requestDetails"]["nonce"] = nonce
            accepted = await device.post(
                "/v1/nodes/attestation", json={"nonce": nonce, "token": google.token(verdict)}
            )
            assert accepted.status_code == 200, accepted.text
            assert accepted.json()["verified"] is True
            assert accepted.json()["verified_by"] == "play_integrity"
            replay = await device.post(
                "/v1/nodes/attestation", json={"nonce": nonce, "token": google.token(verdict)}
            )
            assert replay.status_code == 403  # the nonce is spent
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
