"""Schemathesis against the gateway's own OpenAPI document, over a real socket.

One ``swarmgate serve`` process with a ``sim`` device; every operation of the document is
called with examples generated from its schema, valid and invalid. No answer may be a
5xx, every answer must match what the document says of it, and data the schema forbids
must be refused with a 4xx.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.config import SchemathesisConfig

from swarmgate.api.app import create_app
from swarmgate.config import GatewaySettings
from tests.billing.test_stripe import SECRET_KEY, WEBHOOK_SECRET, StripeStandIn
from tests.conftest import (
    ADMIN_TOKEN,
    MODEL,
    free_port,
    stop_process,
    swarmgate_cmd,
    wait_http,
)
from tests.trust.test_attestation import CERT, PACKAGE, FakePlayIntegrity

CHECKS = (
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
)
EXAMPLES = int(os.environ.get("SWARMGATE_FUZZ_EXAMPLES", "40"))


@pytest.fixture(scope="module")
def gateway_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    data = tmp_path_factory.mktemp("fuzzed")
    stripe = StripeStandIn()
    google = FakePlayIntegrity()
    port = free_port()
    env = {
        **os.environ,
        "SWARMGATE_PORT": str(port),
        "SWARMGATE_DATA_DIR": str(data),
        "SWARMGATE_ADMIN_TOKEN": ADMIN_TOKEN,
        "SWARMGATE_QUEUE_WAIT_S": "0.2",
        "SWARMGATE_FIRST_TOKEN_TIMEOUT_S": "2",
        # Every optional part configured, so that no answer is a "not configured" 503.
        "SWARMGATE_STRIPE_SECRET_KEY": SECRET_KEY,
        "SWARMGATE_STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "SWARMGATE_STRIPE_API_BASE": stripe.base_url,
        "SWARMGATE_PLAY_INTEGRITY_PACKAGE": PACKAGE,
        "SWARMGATE_PLAY_INTEGRITY_DECRYPTION_KEY": google.decryption_key_b64,
        "SWARMGATE_PLAY_INTEGRITY_VERIFICATION_KEY": google.verification_key_b64,
        "SWARMGATE_PLAY_INTEGRITY_CERTIFICATE_DIGESTS": json.dumps([CERT]),
        "SWARMGATE_VAULT_MASTER_SECRET": "fuzz-vault-master-secret-0123456789abcdef",
    }
    log = (data / "gateway.log").open("wb")
    gateway = subprocess.Popen(  # noqa: S603 - our own CLI
        swarmgate_cmd("serve"), env=env, stdout=log, stderr=subprocess.STDOUT
    )
    node: subprocess.Popen[bytes] | None = None
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/healthz")
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        with httpx.Client(base_url=base, headers=admin, timeout=10) as client:
            account = client.post(
                "/admin/accounts", json={"name": "fuzz", "credit_micros": 1_000_000_000}
            ).json()
            key = client.post(f"/admin/accounts/{account['id']}/keys", json={}).json()
            provider = client.post(
                "/admin/accounts", json={"name": "prov", "developer": False, "provider": True}
            ).json()
            device = client.post("/admin/devices", json={"account_id": provider["id"]}).json()
        node = subprocess.Popen(  # noqa: S603 - our own CLI
            swarmgate_cmd(
                "node",
                "--gateway",
                f"ws://127.0.0.1:{port}/v1/nodes/connect",
                "--token",
                device["token"],
                "--backend",
                "sim",
                "--model",
                MODEL,
                "--slots",
                "8",
            ),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        yield {"base": base, "key": key["key"], "device": device["token"]}
    finally:
        if node is not None:
            stop_process(node)
        stop_process(gateway)
        log.close()
        stripe.close()


def _document() -> dict[str, Any]:
    """The document as the app builds it; the calls go to the real server."""
    return create_app(GatewaySettings(data_dir=Path(tempfile.gettempdir()))).openapi()


# Refusing data the schema forbids: any 4xx the error handler documents (413 included: a
# body past the limit is refused before it is read).
REFUSALS = ["400", "401", "402", "403", "404", "405", "409", "413", "415", "422", "429"]
SCHEMA = schemathesis.openapi.from_dict(
    _document(),
    config=SchemathesisConfig.from_dict(
        {"checks": {"negative_data_rejection": {"expected-statuses": REFUSALS}}}
    ),
)
OPERATIONS = {result.ok().label: result.ok() for result in SCHEMA.get_all_operations()}


def credentials(path: str, urls: dict[str, str]) -> dict[str, str]:
    if path.startswith("/admin"):
        return {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    if path.startswith("/v1/nodes"):
        return {"Authorization": f"Bearer {urls['device']}"}
    return {"Authorization": f"Bearer {urls['key']}"}


def fuzz(operation: Any, mode: GenerationMode, urls: dict[str, str]) -> None:
    """Calls ``operation`` with examples of ``mode`` and checks every answer."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
        derandomize=True,
    )
    def call(case: Any) -> None:
        headers = {**(case.headers or {}), **credentials(case.path, urls)}
        case.call_and_validate(base_url=urls["base"], headers=headers, checks=CHECKS, timeout=30)

    call()


@pytest.mark.parametrize("label", sorted(OPERATIONS))
def test_every_operation_keeps_its_contract(label: str, gateway_url: dict[str, str]) -> None:
    operation = OPERATIONS[label]
    fuzz(operation, GenerationMode.POSITIVE, gateway_url)
    # Then data the schema forbids, where the schema forbids anything: an operation with
    # no parameters and no body (or only free-form strings) leaves nothing to break.
    with contextlib.suppress(Unsatisfiable):
        fuzz(operation, GenerationMode.NEGATIVE, gateway_url)


def test_the_document_covers_every_route(gateway_url: dict[str, str]) -> None:
    document = httpx.get(f"{gateway_url['base']}/openapi.json", timeout=10).json()
    paths = set(document["paths"])
    for path in ("/v1/chat/completions", "/v1/keys", "/v1/usage", "/v1/conversations"):
        assert path in paths
    assert not any(p.startswith("/dashboard") for p in paths)  # pages, not API
