"""Every error Swarmgate raises on purpose, in one tree.

    SwarmgateError
    ├── RequestError              400 INVALID_REQUEST          (bad body, bad field)
    │   ├── BodyTooLarge          413 REQUEST_TOO_LARGE
    │   ├── ModelNotFound         404 MODEL_NOT_FOUND
    │   └── ContextLengthExceeded 400 CONTEXT_LENGTH_EXCEEDED  (the messages and max_tokens
    │                                                          do not fit the model)
    ├── AuthError                 401 INVALID_API_KEY          (also INVALID_DEVICE_TOKEN)
    │   └── AdminAuthError        401 INVALID_ADMIN_TOKEN
    ├── NotFound                  404 NOT_FOUND                (job, resource of another account)
    │   └── ConversationNotFound  404 CONVERSATION_NOT_FOUND
    ├── MemoryUnavailable         503 CONVERSATION_NOT_SAVED   (the exchange could not be stored)
    ├── Forbidden                 403 FORBIDDEN                (also MODEL_NOT_ALLOWED: a model off
    │                                                          the key's list; PRIVACY_MODE_FORBIDS_CLOUD;
    │                                                          SIGNUP_DISABLED; CSRF_REJECTED on forms)
    ├── Conflict                  409 CONFLICT                 (e.g. an idempotent request in flight)
    ├── IdempotencyMismatch       422 IDEMPOTENCY_KEY_REUSED   (same key, different request)
    ├── RateLimited               429 RATE_LIMIT_EXCEEDED      (the key's rpm/tpm bucket is empty)
    ├── BillingError              402 BILLING_ERROR            (the ledger refused a money movement)
    │   ├── InsufficientCredits   402 INSUFFICIENT_CREDITS     (available balance cannot cover a hold)
    │   ├── SpendCapReached       402 DAILY_SPEND_CAP_EXCEEDED (the key's daily cap would be passed)
    │   └── BillingUnavailable    503 BILLING_UNAVAILABLE      (a charge could not be written)
    ├── AttestationFailed         403 ATTESTATION_<REASON>     (an integrity token was rejected)
    ├── AttestationUnavailable    503 ATTESTATION_NOT_CONFIGURED
    ├── VaultNotConfigured        503 VAULT_NOT_CONFIGURED     (no vault master secret)
    ├── CloudUnavailable          503 CLOUD_UNAVAILABLE        (no upstream for a cloud model)
    ├── UpstreamError             502 UPSTREAM_ERROR           (a cloud upstream failed)
    │   ├── UpstreamAddressRefused 502 UPSTREAM_ADDRESS_REFUSED (a vault base URL the gateway
    │   │                                                       will not call)
    │   ├── UpstreamAuthFailed    502 UPSTREAM_AUTH_FAILED     (it refused the key)
    │   ├── UpstreamRateLimited   429 UPSTREAM_RATE_LIMITED    (with its Retry-After)
    │   └── UpstreamTimeout       504 UPSTREAM_TIMEOUT
    ├── PaymentsNotConfigured     503 PAYMENTS_NOT_CONFIGURED  (no Stripe keys on this gateway)
    ├── PaymentProviderError      502 PAYMENT_PROVIDER_ERROR   (Stripe refused or was unreachable)
    ├── RoutingError              503 NO_DEVICE_AVAILABLE      (no device can take the request)
    │   ├── ModelWarming          503 model_warming            (catalog model, no device has it loaded)
    │   ├── NoDeviceMatches       503 NO_..._DEVICE / ..._ABOVE_MAX (the request's routing
    │   │                                                       constraints leave no device)
    │   └── DevicesBusy           503 DEVICES_BUSY             (every capable device stayed busy)
    ├── ModelStoreError           500 MODEL_STORE_ERROR        (a node could not fetch or verify a model)
    └── DeviceError                                            (a device failed a job)
        ├── DeviceFailed          502 DEVICE_FAILED            (one attempt; internal, drives failover)
        ├── DeviceTimeout         408 REQUEST_TIMEOUT          (one attempt timed out)
        ├── DeviceGone            502 DEVICE_GONE              (the connection dropped mid-job)
        ├── AllAttemptsFailed     502 ALL_ATTEMPTS_FAILED      (failover exhausted)
        └── StreamInterrupted     502 STREAM_INTERRUPTED       (tokens were sent, then the device failed)

Outside the tree, ``api/errors.py`` answers what the web framework itself refuses with the
same envelope: 404 NOT_FOUND (no such route), 405 METHOD_NOT_ALLOWED, 415
UNSUPPORTED_MEDIA_TYPE, another status as HTTP_ERROR; and anything unexpected as 500
INTERNAL_ERROR, logged (the tests and the fuzzing treat any 500 as a bug).

Each class carries its HTTP status, OpenAI-style ``type`` and the seeds' ``code``;
``api/errors.py`` turns any of them into the envelope in exactly one place.
"""

from __future__ import annotations

from typing import Any


class SwarmgateError(Exception):
    status_code: int = 500
    code: str = "INTERNAL_ERROR"
    type: str = "api_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        retry_after: int | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, Any]:
        error: dict[str, Any] = {
            "message": self.message,
            "type": self.type,
            "code": self.code,
            "param": self.param,
        }
        if self.retry_after is not None:
            error["retry_after"] = self.retry_after
        return {"error": error}


class RequestError(SwarmgateError):
    status_code = 400
    code = "INVALID_REQUEST"
    type = "invalid_request_error"


class BodyTooLarge(RequestError):
    status_code = 413
    code = "REQUEST_TOO_LARGE"


class ModelNotFound(RequestError):
    status_code = 404
    code = "MODEL_NOT_FOUND"


class AuthError(SwarmgateError):
    status_code = 401
    code = "INVALID_API_KEY"
    type = "authentication_error"


class AdminAuthError(AuthError):
    code = "INVALID_ADMIN_TOKEN"


class NotFound(SwarmgateError):
    status_code = 404
    code = "NOT_FOUND"
    type = "invalid_request_error"


class ConversationNotFound(NotFound):
    code = "CONVERSATION_NOT_FOUND"


class ContextLengthExceeded(RequestError):
    """The request's own messages, with max_tokens, do not fit the model's context."""

    code = "CONTEXT_LENGTH_EXCEEDED"


class MemoryUnavailable(SwarmgateError):
    """A conversation's exchange could not be stored; the answer is withheld, unpaid."""

    status_code = 503
    code = "CONVERSATION_NOT_SAVED"


class Forbidden(SwarmgateError):
    """Authenticated, but this key or account may not do this (e.g. a model off its list)."""

    status_code = 403
    code = "FORBIDDEN"
    type = "permission_error"


class Conflict(SwarmgateError):
    """The request clashes with the state of the resource (e.g. an idempotent replay)."""

    status_code = 409
    code = "CONFLICT"
    type = "invalid_request_error"


class IdempotencyMismatch(SwarmgateError):
    status_code = 422
    code = "IDEMPOTENCY_KEY_REUSED"
    type = "invalid_request_error"


class RateLimited(SwarmgateError):
    status_code = 429
    code = "RATE_LIMIT_EXCEEDED"
    type = "rate_limit_error"


class BillingError(SwarmgateError):
    """The ledger refused to move money; ``code`` says why (e.g. HOLD_NOT_OPEN)."""

    status_code = 402
    code = "BILLING_ERROR"
    type = "billing_error"


class InsufficientCredits(BillingError):
    code = "INSUFFICIENT_CREDITS"
    type = "insufficient_quota"


class BillingUnavailable(BillingError):
    """A completed job's charge could not be written; the answer is withheld, unpaid."""

    status_code = 503
    code = "BILLING_UNAVAILABLE"
    type = "api_error"


class SpendCapReached(BillingError):
    """The key's daily spend cap would be passed; the account itself may still have credit."""

    code = "DAILY_SPEND_CAP_EXCEEDED"
    type = "insufficient_quota"


class AttestationFailed(SwarmgateError):
    status_code = 403
    code = "ATTESTATION_FAILED"
    type = "permission_error"


class AttestationUnavailable(SwarmgateError):
    status_code = 503
    code = "ATTESTATION_NOT_CONFIGURED"
    type = "service_unavailable"


class VaultNotConfigured(SwarmgateError):
    status_code = 503
    code = "VAULT_NOT_CONFIGURED"
    type = "service_unavailable"


class CloudUnavailable(SwarmgateError):
    """No configured upstream serves the model."""

    status_code = 503
    code = "CLOUD_UNAVAILABLE"
    type = "service_unavailable"


class UpstreamError(SwarmgateError):
    status_code = 502
    code = "UPSTREAM_ERROR"
    type = "upstream_error"


class UpstreamAddressRefused(UpstreamError):
    """A developer's base URL points at an address the gateway will not call."""

    code = "UPSTREAM_ADDRESS_REFUSED"


class UpstreamAuthFailed(UpstreamError):
    code = "UPSTREAM_AUTH_FAILED"


class UpstreamRateLimited(UpstreamError):
    status_code = 429
    code = "UPSTREAM_RATE_LIMITED"
    type = "rate_limit_error"


class UpstreamTimeout(UpstreamError):
    status_code = 504
    code = "UPSTREAM_TIMEOUT"
    type = "timeout_error"


class PaymentsNotConfigured(SwarmgateError):
    """Stripe keys are not set on this gateway."""

    status_code = 503
    code = "PAYMENTS_NOT_CONFIGURED"
    type = "service_unavailable"


class PaymentProviderError(SwarmgateError):
    """Stripe refused a request or could not be reached."""

    status_code = 502
    code = "PAYMENT_PROVIDER_ERROR"
    type = "api_error"


class RoutingError(SwarmgateError):
    status_code = 503
    code = "NO_DEVICE_AVAILABLE"
    type = "service_unavailable"


class ModelWarming(RoutingError):
    code = "model_warming"


class NoDeviceMatches(RoutingError):
    """Devices serve the model, but the request's constraints rule every one out; ``code``
    names the constraint that emptied the field and ``param`` the request field."""

    code = "NO_DEVICE_AVAILABLE"


class DevicesBusy(RoutingError):
    code = "DEVICES_BUSY"


class DeviceError(SwarmgateError):
    status_code = 502
    code = "DEVICE_FAILED"
    type = "device_error"


class DeviceFailed(DeviceError):
    pass


class DeviceTimeout(DeviceError):
    status_code = 408
    code = "REQUEST_TIMEOUT"
    type = "timeout_error"


class DeviceGone(DeviceError):
    code = "DEVICE_GONE"


class AllAttemptsFailed(DeviceError):
    code = "ALL_ATTEMPTS_FAILED"


class StreamInterrupted(DeviceError):
    code = "STREAM_INTERRUPTED"


class ModelStoreError(SwarmgateError):
    """A node could not fetch or verify a model file; ``code`` says why: NO_ARTIFACT,
    DOWNLOAD_FAILED, DISK_FULL, CHECKSUM_MISMATCH or INVALID_MODEL_ID."""

    code = "MODEL_STORE_ERROR"
    type = "model_store_error"


class ProtocolViolation(Exception):
    """A node sent a frame that breaks the device protocol; closes that connection only."""

    def __init__(self, close_code: int, reason: str) -> None:
        super().__init__(reason)
        self.close_code = close_code
        self.reason = reason


class IllegalTransition(RuntimeError):
    """A state machine was asked to move along an edge it does not have."""
