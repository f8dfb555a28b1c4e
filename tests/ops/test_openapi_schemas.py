"""The OpenAPI document gives every success a real schema, and the gateway keeps to it.

First the document alone: no JSON success is left as a bare object, every ``$ref``
resolves, every schema is valid JSON Schema and stays open to new fields. Then real
gateways, driven through the successful paths that fuzzing seldom reaches (a payout
approved, a job polled until done, an orchestrated run, a paid Stripe session, an
accepted attestation): each answer, and each server-sent event, is validated against
the schema the document gives for its operation and status.
"""

from __future__ import annotations

import asyncio
import functools
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import orjson
import pytest

from swarmgate.accounts import service
from swarmgate.api.app import create_app
from swarmgate.api.openapi import SUCCESS
from swarmgate.api.response_schemas import SCHEMAS
from swarmgate.config import GatewaySettings
from tests.billing.test_payouts import earning_provider
from tests.billing.test_request_billing import priced_catalog
from tests.billing.test_stripe import SECRET_KEY, WEBHOOK_SECRET, StripeStandIn, session_event, sign
from tests.cloud.mock_upstream import GOOD_KEY, MockUpstream
from tests.cloud.test_cloud import write_catalog
from tests.conftest import (
    ADMIN_TOKEN,
    MODEL,
    LiveGateway,
    fast_settings,
    start_gateway,
    stop_gateway,
)
from tests.trust.test_attestation import CERT, PACKAGE, FakePlayIntegrity

METHODS = ("get", "post", "put", "patch", "delete")
# Successes whose JSON body is free-form, and so documented as any object. None today:
# every handler answers with a shape of its own.
FREE_FORM: frozenset[tuple[str, str]] = frozenset()


@functools.cache
def document() -> dict[str, Any]:
    return create_app(GatewaySettings(data_dir=Path(tempfile.gettempdir()))).openapi()


def operations() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document()["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                yield path, method, operation


def successes() -> Iterator[tuple[str, str, str, dict[str, Any]]]:
    for path, method, operation in operations():
        for status, response in operation["responses"].items():
            if status.startswith("2"):
                yield path, method, status, response


def walk(node: Any) -> Iterator[Any]:
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from walk(child)


def resolve(pointer: str) -> Any:
    assert pointer.startswith("#/"), pointer
    node: Any = document()
    for part in pointer[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


# -- the document ---------------------------------------------------------------------------
def test_every_json_success_has_a_schema_of_its_own() -> None:
    bare = []
    for path, method, status, response in successes():
        json = response["content"].get("application/json")
        if json is None:
            assert path == "/metrics" and "text/plain" in response["content"]
            continue
        if (path, method) in FREE_FORM:
            continue
        if json["schema"] == {"type": "object"}:
            bare.append(f"{method.upper()} {path} {status}")
        else:
            assert set(json["schema"]) == {"$ref"}, (path, method)
    assert bare == []


def test_every_operation_is_in_the_table() -> None:
    documented = {(p, m, s) for p, m, s, r in successes() if "application/json" in r["content"]}
    assert documented == set(SUCCESS)
    assert len(documented) + 1 == sum(1 for _ in operations())  # /metrics is text


def test_every_ref_resolves() -> None:
    refs = {node["$ref"] for node in walk(document()) if isinstance(node, dict) and "$ref" in node}
    assert "#/components/schemas/ChatCompletion" in refs
    for pointer in refs:
        assert isinstance(resolve(pointer), dict), pointer


def test_the_schemas_are_json_schema_and_answers_stay_open() -> None:
    components = document()["components"]["schemas"]
    for name, schema in components.items():
        assert jsonschema_rs.meta.is_valid(schema), name
    # Requests refuse unknown fields; answers may gain fields without breaking clients.
    for name in [*SCHEMAS, "Error"]:
        for node in walk(components[name]):
            if isinstance(node, dict) and node.get("type") == "object":
                assert node.get("additionalProperties", True) is not False, name


def test_streamed_answers_are_documented_as_server_sent_events() -> None:
    streamed = {"/v1/chat/completions": "ChatCompletionChunk", "/v1/inference": "InferenceChunk"}
    for path, chunk in streamed.items():
        content = document()["paths"][path]["post"]["responses"]["200"]["content"]
        refs = [option["$ref"] for option in content["text/event-stream"]["x-event-data"]["oneOf"]]
        assert refs == [f"#/components/schemas/{chunk}", "#/components/schemas/Error"]
    for path, item in document()["paths"].items():
        for method, operation in item.items():
            if path not in streamed and method in METHODS:
                assert "text/event-stream" not in operation["responses"].get("200", {}).get(
                    "content", {}
                ), path


def test_not_ready_is_described_as_the_probe_answers_it() -> None:
    responses = document()["paths"]["/readyz"]["get"]["responses"]
    assert responses["503"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Readiness"
    }


# -- the gateway's answers ------------------------------------------------------------------
def events(text: str) -> list[Any]:
    lines = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert lines and lines[-1] == "[DONE]", text[-300:]
    return [orjson.loads(line) for line in lines[:-1]]


class Conformance:
    """Checks answers against the document; remembers which operations it saw succeed."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, str]] = set()

    def validate(self, schema: dict[str, Any], body: Any, where: str) -> None:
        rooted = {"components": document()["components"], **schema}
        validator = jsonschema_rs.Draft202012Validator(rooted, validate_formats=True)
        errors = [f"{e.instance_path}: {e.message}" for e in validator.iter_errors(body)]
        assert errors == [], f"{where}: {errors}"

    async def check(self, pending: Awaitable[httpx.Response], path: str) -> Any:
        """The answer's JSON (or its events' data), once it matches the document."""
        response = await pending
        method = response.request.method.lower()
        where = f"{method.upper()} {path} -> {response.status_code}"
        assert response.is_success, f"{where}: {response.text}"
        content = document()["paths"][path][method]["responses"][str(response.status_code)][
            "content"
        ]
        media = response.headers["content-type"].split(";")[0]
        assert media in content, where
        self.seen.add((method, path))
        if media == "text/event-stream":
            found = events(response.text)
            for event in found:
                self.validate(content[media]["x-event-data"], event, where)
            return found
        body = response.json()
        self.validate(content[media]["schema"], body, where)
        return body


@pytest.fixture
async def priced(tmp_path: Path) -> AsyncIterator[LiveGateway]:
    live = await start_gateway(fast_settings(tmp_path, catalog_path=priced_catalog(tmp_path)))
    try:
        yield live
    finally:
        await stop_gateway(live)


def chat(content: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 8,
        **extra,
    }


async def test_accounts_keys_and_admin_answers(live: LiveGateway) -> None:
    api = Conformance()
    async with live.client(ADMIN_TOKEN) as admin, live.client() as anyone:
        await api.check(anyone.get("/healthz"), "/healthz")
        await api.check(anyone.get("/readyz"), "/readyz")
        account = await api.check(
            admin.post("/admin/accounts", json={"name": "dev", "credit_micros": 1_000_000}),
            "/admin/accounts",
        )
        await api.check(admin.get("/admin/accounts"), "/admin/accounts")
        await api.check(
            admin.post(
                f"/admin/accounts/{account['id']}/keys",
                json={"name": "ci", "mode": "test", "expires_at": "2030-01-01T00:00:00Z"},
            ),
            "/admin/accounts/{account_id}/keys",
        )
        await api.check(
            admin.post(f"/admin/accounts/{account['id']}/top-up", json={"amount_usd": "1.50"}),
            "/admin/accounts/{account_id}/top-up",
        )
        provider = await api.check(
            admin.post("/admin/accounts", json={"name": "prov", "provider": True}),
            "/admin/accounts",
        )
        device = await api.check(
            admin.post("/admin/devices", json={"account_id": provider["id"], "name": "pi"}),
            "/admin/devices",
        )
        await live.add_sim_device(token=device["token"])
        listed = await api.check(admin.get("/admin/devices"), "/admin/devices")
        assert listed["data"][0]["connection"] is not None
        await api.check(admin.get("/admin/models"), "/admin/models")
        trust = f"/admin/devices/{device['id']}"
        await api.check(admin.get(f"{trust}/trust"), "/admin/devices/{device_id}/trust")
        await api.check(admin.post(f"{trust}/clear"), "/admin/devices/{device_id}/clear")
        await api.check(
            admin.post(f"{trust}/verify", json={"verified": True}),
            "/admin/devices/{device_id}/verify",
        )

        signup = {"email": "ada@example.org", "password": "correct horse", "name": "Ada"}
        created = await api.check(anyone.post("/v1/auth/signup", json=signup), "/v1/auth/signup")
        session = await api.check(
            anyone.post("/v1/auth/signin", json={k: signup[k] for k in ("email", "password")}),
            "/v1/auth/signin",
        )
        await api.check(
            anyone.post(
                "/v1/auth/signout", headers={"Authorization": f"Bearer {session['token']}"}
            ),
            "/v1/auth/signout",
        )

    async with live.client(created["api_key"]["key"]) as client:
        await api.check(client.get("/v1/account"), "/v1/account")
        new = {
            "name": "ci",
            "daily_spend_cap_usd": "2.5",
            "allowed_models": [MODEL],
            "rpm_limit": 10,
            "expires_in_days": 30,
        }
        key = await api.check(client.post("/v1/keys", json=new), "/v1/keys")
        await api.check(client.get("/v1/keys"), "/v1/keys")
        one = f"/v1/keys/{key['id']}"
        await api.check(client.get(one), "/v1/keys/{key_id}")
        await api.check(client.patch(one, json={"name": "ci-2"}), "/v1/keys/{key_id}")
        rotated = await api.check(
            client.post(f"{one}/rotate", json={"grace_seconds": 60}), "/v1/keys/{key_id}/rotate"
        )
        await api.check(client.delete(f"/v1/keys/{rotated['id']}"), "/v1/keys/{key_id}")
        await api.check(client.get("/v1/models"), "/v1/models")
        await api.check(client.get(f"/v1/models/{MODEL}"), "/v1/models/{model_id}")

        await api.check(client.get("/v1/vault"), "/v1/vault")
        await api.check(client.get("/v1/vault", params={"provider": "nowhere"}), "/v1/vault")
        await api.check(client.delete("/v1/vault"), "/v1/vault")

        hook = {
            "url": "http://127.0.0.1:9/hook",
            "events": ["job.completed", "usage.threshold"],
            "usage_threshold_usd": "1.00",
        }
        endpoint = await api.check(client.post("/v1/webhooks", json=hook), "/v1/webhooks")
        await api.check(client.get("/v1/webhooks"), "/v1/webhooks")
        await api.check(
            client.get(f"/v1/webhooks/{endpoint['id']}/deliveries"),
            "/v1/webhooks/{endpoint_id}/deliveries",
        )
        await api.check(
            client.delete(f"/v1/webhooks/{endpoint['id']}"), "/v1/webhooks/{endpoint_id}"
        )
    assert len(api.seen) == 30


async def test_inference_conversation_and_workflow_answers(priced: LiveGateway) -> None:
    live = priced
    await live.add_sim_device()
    _, key = await live.developer_key()
    api = Conformance()
    completions = "/v1/chat/completions"
    async with live.client(key) as client:
        await api.check(client.post(completions, json=chat("hi")), completions)
        streamed = await api.check(
            client.post(
                completions, json=chat("hi", stream=True, stream_options={"include_usage": True})
            ),
            completions,
        )
        assert streamed[-1]["choices"] == [] and streamed[-1]["usage"]["total_tokens"] > 0

        conversation = await api.check(
            client.post(
                "/v1/conversations",
                json={"title": "otters", "messages": [{"role": "user", "content": "hello"}]},
            ),
            "/v1/conversations",
        )
        one = f"/v1/conversations/{conversation['id']}"
        remembered = await api.check(
            client.post(completions, json=chat("and now?", conversation_id=conversation["id"])),
            completions,
        )
        assert remembered["swarmgate"]["conversation_id"] == conversation["id"]
        await api.check(client.get("/v1/conversations"), "/v1/conversations")
        await api.check(client.get(one), "/v1/conversations/{conversation_id}")
        await api.check(
            client.post(f"{one}/messages", json={"role": "assistant", "content": "noted"}),
            "/v1/conversations/{conversation_id}/messages",
        )
        await api.check(
            client.patch(one, json={"system": "Be brief."}), "/v1/conversations/{conversation_id}"
        )
        await api.check(client.delete(one), "/v1/conversations/{conversation_id}")

        prompt = {"model": MODEL, "prompt": "hi", "max_tokens": 8}
        await api.check(client.post("/v1/inference", json=prompt), "/v1/inference")
        await api.check(
            client.post("/v1/inference", json={**prompt, "stream": True}), "/v1/inference"
        )
        queued = await api.check(client.post("/v1/jobs", json=prompt), "/v1/jobs")
        deadline = time.monotonic() + 20
        while True:
            job = await api.check(client.get(f"/v1/jobs/{queued['id']}"), "/v1/jobs/{job_id}")
            if job["status"] == "completed" or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        assert job["result"]["output"] and job["attempts"], job

        research = {"orchestration": {"enabled": True, "workflow": "research"}}
        run = await api.check(
            client.post(completions, json=chat("Otters", **research)), completions
        )
        await api.check(
            client.post(completions, json=chat("Otters", stream=True, **research)), completions
        )
        await api.check(client.get("/v1/workflows"), "/v1/workflows")
        await api.check(
            client.get(f"/v1/workflows/{run['swarmgate']['workflow']['id']}"),
            "/v1/workflows/{workflow_id}",
        )
        await api.check(
            client.post("/v1/workflows/estimate", json={"model": MODEL, "input": "Otters"}),
            "/v1/workflows/estimate",
        )
        usage = await api.check(client.get("/v1/usage"), "/v1/usage")
        assert usage["by_model"] and usage["by_key"], usage
    assert len(api.seen) == 14


async def test_provider_payout_and_device_answers(priced: LiveGateway) -> None:
    live = priced
    api = Conformance()
    provider = await earning_provider(live.gateway.engine, 17_000_000)
    key = (await service.create_api_key(live.gateway.engine, account_id=provider)).secret
    device = await service.create_device(live.gateway.engine, account_id=provider, name="pi")
    await live.add_sim_device(token=device.secret)
    _, developer = await live.developer_key()
    async with live.client(developer) as client:
        await api.check(
            client.post("/v1/chat/completions", json=chat("hi")), "/v1/chat/completions"
        )

    payouts = "/v1/provider/payouts"
    async with live.client(key) as client, live.client(ADMIN_TOKEN) as admin:
        first = await api.check(
            client.post(payouts, json={"amount_usd": "6.5", "destination": "iban:DE00"}), payouts
        )
        second = await api.check(client.post(payouts, json={"amount_micros": 5_000_000}), payouts)
        await api.check(client.get(payouts), payouts)
        await api.check(client.get(f"{payouts}/{first['id']}"), "/v1/provider/payouts/{payout_id}")
        await api.check(
            client.post(f"{payouts}/{second['id']}/cancel"),
            "/v1/provider/payouts/{payout_id}/cancel",
        )
        third = await api.check(client.post(payouts, json={"amount_usd": 5}), payouts)
        decide = "/admin/payouts/{payout_id}"
        await api.check(admin.get("/admin/payouts"), "/admin/payouts")
        await api.check(
            admin.post(f"/admin/payouts/{first['id']}/approve", json={"note": "ok"}),
            f"{decide}/approve",
        )
        await api.check(admin.post(f"/admin/payouts/{first['id']}/paid"), f"{decide}/paid")
        await api.check(admin.post(f"/admin/payouts/{third['id']}/reject"), f"{decide}/reject")
        earnings = await api.check(client.get("/v1/provider/earnings"), "/v1/provider/earnings")
        assert earnings["by_model"] and earnings["by_device"], earnings

        mine = f"/v1/provider/devices/{device.id}"
        shown = await api.check(client.get(mine), "/v1/provider/devices/{device_id}")
        low, high = shown["price_bounds"][MODEL]
        assert low["input_per_1m_micros"] <= high["input_per_1m_micros"]
        await api.check(
            client.put(f"{mine}/prices", json={"prices": {MODEL: high}}),
            "/v1/provider/devices/{device_id}/prices",
        )

    async with live.client(device.secret) as node:
        await api.check(node.get("/v1/nodes/trust"), "/v1/nodes/trust")
        await api.check(node.get("/v1/nodes/earnings"), "/v1/nodes/earnings")
        await api.check(node.get("/v1/nodes/catalog"), "/v1/nodes/catalog")
    assert len(api.seen) == 15


async def test_payment_and_attestation_answers(tmp_path: Path) -> None:
    stripe, google = StripeStandIn(), FakePlayIntegrity()
    settings = fast_settings(
        tmp_path,
        stripe_secret_key=SECRET_KEY,
        stripe_webhook_secret=WEBHOOK_SECRET,
        stripe_api_base=stripe.base_url,
        play_integrity_package=PACKAGE,
        play_integrity_decryption_key=google.decryption_key_b64,
        play_integrity_verification_key=google.verification_key_b64,
        play_integrity_certificate_digests=[CERT],
    )
    live = await start_gateway(settings)
    api = Conformance()
    webhook = "/v1/billing/stripe/webhook"
    try:
        account, key = await live.developer_key()
        _, token = await live.device_token()
        async with live.client(key) as client, live.client() as anyone:
            await api.check(
                client.post("/v1/billing/checkout", json={"amount_usd": "12.34"}),
                "/v1/billing/checkout",
            )
            for payload in (
                session_event(account),
                session_event(account, event_id="evt_2", payment_status="unpaid"),
            ):
                await api.check(
                    anyone.post(
                        webhook, content=payload, headers={"Stripe-Signature": sign(payload)}
                    ),
                    webhook,
                )
        async with live.client(token) as device:
            nonce = "/v1/nodes/attestation/nonce"
            issued = await api.check(device.post(nonce), nonce)
            now_ms = str(int(datetime.now(UTC).timestamp() * 1000))
            verdict = google.verdict(
                requestDetails__nonce=issued["nonce"], requestDetails__timestampMillis=now_ms
            )
            attested = await api.check(
                device.post(
                    "/v1/nodes/attestation",
                    json={"nonce": issued["nonce"], "token": google.token(verdict)},
                ),
                "/v1/nodes/attestation",
            )
            assert attested["verified"] is True
    finally:
        await stop_gateway(live)
        stripe.close()
    assert len(api.seen) == 4


async def test_cloud_and_vault_answers(tmp_path: Path) -> None:
    alpha = MockUpstream("alpha")
    await alpha.start()
    own_key = "sk-developer-own-key-1234"
    alpha.keys.add(own_key)
    settings = fast_settings(
        tmp_path,
        catalog_path=write_catalog(tmp_path / "catalog.json"),
        upstreams=[{"name": "alpha", "base_url": alpha.base_url, "api_key": GOOD_KEY}],
        vault_master_secret="schema-test-vault-master-secret-0123456789",
    )
    live = await start_gateway(settings)
    api = Conformance()
    try:
        _, key = await live.developer_key()
        async with live.client(key) as client:
            vault = "/v1/vault"
            await api.check(
                client.post(vault, json={"provider": "alpha", "apiKey": own_key}), vault
            )
            await api.check(client.get(vault), vault)
            await api.check(client.get(vault, params={"provider": "alpha"}), vault)
            cloud = {**chat("hi"), "model": "cloud-good"}
            completions = "/v1/chat/completions"
            answer = await api.check(client.post(completions, json=cloud), completions)
            assert answer["swarmgate"]["byok"] is True
            await api.check(client.post(completions, json={**cloud, "stream": True}), completions)
            prompt = {"model": "cloud-good", "prompt": "hi", "max_tokens": 8}
            await api.check(client.post("/v1/inference", json=prompt), "/v1/inference")
            await api.check(client.delete(vault, params={"provider": "alpha"}), vault)
    finally:
        await stop_gateway(live)
        await alpha.stop()
    assert len(api.seen) == 5
