"""The signature scheme receivers rely on: what verifies and what does not."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from swarmgate.webhooks.signing import (
    SignatureError,
    compute_signature,
    new_secret,
    signature_header,
    verify,
)

SECRET = "whsec_test_secret"
BODY = b'{"id":"evt_1","type":"job.completed","created":1764000000,"data":{}}'
T = 1_764_000_000


def test_the_signature_is_the_documented_hmac() -> None:
    expected = hmac.new(SECRET.encode(), f"{T}.".encode() + BODY, hashlib.sha256).hexdigest()
    assert compute_signature(SECRET, BODY, T) == expected
    assert signature_header(SECRET, BODY, T) == f"t={T},v1={expected}"


def test_a_fresh_signature_verifies_and_returns_its_timestamp() -> None:
    assert verify(SECRET, BODY, signature_header(SECRET, BODY, T), now=T + 10) == T


def test_secrets_are_prefixed_and_unique() -> None:
    first, second = new_secret(), new_secret()
    assert first.startswith("whsec_") and second.startswith("whsec_")
    assert first != second and len(first) > 40


def test_any_of_several_signatures_may_match() -> None:
    good = compute_signature(SECRET, BODY, T)
    header = f"t={T},v1={'0' * 64},v1={good}"
    assert verify(SECRET, BODY, header, now=T) == T


@pytest.mark.parametrize(
    ("header", "body", "secret", "now", "reason"),
    [
        (None, BODY, SECRET, T, "no Swarmgate-Signature"),
        ("", BODY, SECRET, T, "no Swarmgate-Signature"),
        ("garbage", BODY, SECRET, T, "no timestamp"),
        (f"v1={'a' * 64}", BODY, SECRET, T, "no timestamp"),
        (f"t=abc,v1={'a' * 64}", BODY, SECRET, T, "non-numeric"),
        (f"t={T}", BODY, SECRET, T, "no v1="),
        (f"t={T},v0=abc", BODY, SECRET, T, "no v1="),
        ("SIGNED", BODY + b" ", SECRET, T, "no signature matches"),
        ("SIGNED", BODY, "whsec_other", T, "no signature matches"),
        (f"t={T},v1=é", BODY, SECRET, T, "no signature matches"),
        ("SIGNED", BODY, SECRET, T + 301, "more than 300 s"),
        ("SIGNED", BODY, SECRET, T - 301, "more than 300 s"),
    ],
)
def test_what_is_refused(
    header: str | None, body: bytes, secret: str, now: int, reason: str
) -> None:
    if header == "SIGNED":
        header = signature_header(SECRET, BODY, T)
    with pytest.raises(SignatureError, match=reason):
        verify(secret, body, header, now=now)


def test_tolerance_zero_skips_the_age_check() -> None:
    header = signature_header(SECRET, BODY, T)
    assert verify(SECRET, BODY, header, tolerance_s=0, now=T + 10**6) == T
