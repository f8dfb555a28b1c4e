"""Signing outgoing webhooks, and the check a receiver runs to trust one.

Every delivery is a ``POST`` of a JSON event with these headers::

    Swarmgate-Signature: t=1764000000,v1=5257a869e7ecebeda32affa62cdca3fa51cad7e77a0e56ff536d0ce8e108d8bd
    Swarmgate-Event-Id: evt_3f1c0a9be27d4c55a1d0c2e8b6f4a913
    Swarmgate-Event-Type: job.completed

``t`` is the Unix time the attempt was sent (a retry is signed afresh) and ``v1`` is
the lowercase hex HMAC-SHA256 of ``f"{t}.{body}"`` keyed with the endpoint's secret
(``whsec_…``, the whole string, shown once when the endpoint is created); ``body`` is
the raw request body, byte for byte. A receiver should:

1. recompute the HMAC over the raw body it received (before any JSON parsing) and
   compare it in constant time with each ``v1`` in the header (there may be several
   while a secret is being rotated);
2. refuse a ``t`` older than a few minutes, so a captured delivery cannot be replayed
   later;
3. treat ``Swarmgate-Event-Id`` (also the payload's ``id``) as an idempotency key: a
   delivery may arrive more than once.

:func:`verify` does the first two; it needs nothing but the standard library, so a
receiver can copy this module as it is::

    from swarmgate.webhooks.signing import SignatureError, verify

    try:
        verify(secret, raw_body, request.headers.get("Swarmgate-Signature"))
    except SignatureError:
        return 400
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

SIGNATURE_HEADER = "Swarmgate-Signature"
EVENT_ID_HEADER = "Swarmgate-Event-Id"
EVENT_TYPE_HEADER = "Swarmgate-Event-Type"
SCHEME = "v1"
SECRET_PREFIX = "whsec_"  # noqa: S105 - a prefix, not a secret
DEFAULT_TOLERANCE_S = 300


class SignatureError(ValueError):
    """The signature header is missing, malformed, wrong or too old."""


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def compute_signature(secret: str, body: bytes, timestamp: int) -> str:
    message = str(timestamp).encode() + b"." + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signature_header(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The ``Swarmgate-Signature`` value for ``body`` sent at ``timestamp`` (default: now)."""
    when = int(time.time()) if timestamp is None else timestamp
    return f"t={when},{SCHEME}={compute_signature(secret, body, when)}"


def _parse(header: str) -> tuple[int, list[str]]:
    timestamp: int | None = None
    signatures: list[str] = []
    for item in header.split(","):
        name, sep, value = item.strip().partition("=")
        if not sep:
            continue
        if name == "t":
            if not value.isdigit():
                raise SignatureError("the signature header has a non-numeric timestamp")
            timestamp = int(value)
        elif name == SCHEME:
            signatures.append(value)
    if timestamp is None:
        raise SignatureError("the signature header has no timestamp (t=)")
    if not signatures:
        raise SignatureError(f"the signature header has no {SCHEME}= signature")
    return timestamp, signatures


def verify(
    secret: str,
    body: bytes,
    header: str | None,
    *,
    tolerance_s: int = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> int:
    """Checks a delivery's signature and age; returns its timestamp or raises SignatureError.

    ``tolerance_s`` 0 skips the age check (useful only when replaying a stored delivery).
    """
    if not header:
        raise SignatureError(f"no {SIGNATURE_HEADER} header")
    timestamp, signatures = _parse(header)
    expected = compute_signature(secret, body, timestamp)
    # Every candidate is compared, so the time taken does not tell which one matched.
    matched = False
    for candidate in signatures:
        matched |= hmac.compare_digest(expected.encode(), candidate.encode())
    if not matched:
        raise SignatureError("no signature matches the body")
    current = time.time() if now is None else now
    if tolerance_s and abs(current - timestamp) > tolerance_s:
        raise SignatureError(f"the signature timestamp is more than {tolerance_s} s away")
    return timestamp
