"""The dashboard over HTTP: sessions, CSRF, isolation between accounts, and every page
showing what the API and the ledger say."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from swarmgate.accounts.keys import new_id
from swarmgate.dashboard.pages import SIGN_IN_ATTEMPTS_PER_MINUTE
from swarmgate.dashboard.web import PRESESSION_COOKIE, SESSION_COOKIE, csrf_for_session
from swarmgate.routing.states import ConnectionState
from swarmgate.workflows.engine import StepRecord
from tests.billing.test_stripe import SECRET_KEY, StripeStandIn
from tests.conftest import MODEL, LiveGateway, fast_settings, start_gateway, stop_gateway
from tests.dashboard.conftest import Visitor, csrf_of, new_key_of, visitor

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 8}


@pytest.fixture
async def dev(live: LiveGateway) -> AsyncIterator[Visitor]:
    person = visitor(live)
    await person.sign_up("ada@example.com")
    try:
        yield person
    finally:
        await person.client.aclose()


async def chat(live: LiveGateway, key: str, **extra: object) -> int:
    async with live.client(key) as client:
        response = await client.post("/v1/chat/completions", json={**CHAT, **extra})
    return response.status_code


# -- sessions and CSRF --------------------------------------------------------------------
async def test_sign_up_opens_a_locked_down_session_and_shows_the_first_key_once(
    live: LiveGateway,
) -> None:
    person = visitor(live)
    async with person.client:
        await person.get("/dashboard/signup")
        response = await person.post(
            "/dashboard/signup",
            {"email": "grace@example.com", "password": "a long password", "roles": "developer"},
        )
        assert response.status_code == 201
        cookie = next(
            h for h in response.headers.get_list("set-cookie") if h.startswith(SESSION_COOKIE)
        )
        assert "HttpOnly" in cookie
        assert "SameSite=lax" in cookie
        assert "Path=/dashboard" in cookie
        secret = new_key_of(response.text)
        assert secret.startswith("sg_live_")
        assert response.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
        # The key works, and is never shown again.
        assert await chat(live, secret) in (200, 503)
        keys_page = await person.get("/dashboard/keys")
        assert keys_page.status_code == 200
        assert secret not in keys_page.text
        assert secret[:12] in keys_page.text  # its prefix names it


async def test_pages_need_a_session(live: LiveGateway) -> None:
    person = visitor(live)
    async with person.client:
        for path in ("/dashboard/", "/dashboard/keys", "/dashboard/usage", "/dashboard/provider"):
            response = await person.get(path)
            assert response.status_code == 303
            assert response.headers["location"].startswith("/dashboard/signin?next=/dashboard")
        # A form posted without a session changes nothing and goes to sign-in.
        response = await person.client.post("/dashboard/keys", data={"name": "x", "csrf": "x"})
        assert response.status_code == 303
        # The public network page needs none.
        assert (await person.get("/dashboard/network")).status_code == 200


async def test_forms_without_the_right_token_or_from_another_site_are_refused(
    live: LiveGateway, dev: Visitor
) -> None:
    before = (await dev.get("/dashboard/keys")).text.count("data-key-id=")
    refused = await dev.client.post("/dashboard/keys", data={"name": "forged"})
    assert refused.status_code == 403
    assert "CSRF_REJECTED" in refused.text
    wrong = await dev.client.post("/dashboard/keys", data={"name": "forged", "csrf": "0" * 64})
    assert wrong.status_code == 403
    token = csrf_of((await dev.get("/dashboard/keys")).text)
    foreign = await dev.client.post(
        "/dashboard/keys",
        data={"name": "forged", "csrf": token},
        headers={"Origin": "https://evil.example"},
    )
    assert foreign.status_code == 403
    cross_site = await dev.client.post(
        "/dashboard/keys",
        data={"name": "forged", "csrf": token},
        headers={"Sec-Fetch-Site": "cross-site"},
    )
    assert cross_site.status_code == 403
    after = (await dev.get("/dashboard/keys")).text
    assert after.count("data-key-id=") == before
    assert "forged" not in after
    # The token is bound to the session: another session's token does not fit.
    assert token == csrf_for_session(dev.client.cookies[SESSION_COOKIE])


async def test_sign_in_form_needs_its_own_cookie_token(live: LiveGateway, dev: Visitor) -> None:
    other = visitor(live)
    async with other.client:
        page = await other.get("/dashboard/signin")
        assert PRESESSION_COOKIE in other.client.cookies
        other.client.cookies.delete(PRESESSION_COOKIE)
        response = await other.client.post(
            "/dashboard/signin",
            data={
                "csrf": csrf_of(page.text),
                "email": "ada@example.com",
                "password": "correct horse battery",
            },
        )
        assert response.status_code == 403
        assert SESSION_COOKIE not in other.client.cookies


async def test_sign_in_wrong_password_then_right_then_sign_out(
    live: LiveGateway, dev: Visitor
) -> None:
    person = visitor(live)
    async with person.client:
        await person.get("/dashboard/signin?next=/dashboard/usage")
        wrong = await person.post(
            "/dashboard/signin",
            {"email": "ada@example.com", "password": "not it at all", "next": "/dashboard/usage"},
        )
        assert wrong.status_code == 401
        assert "Incorrect email or password." in wrong.text
        right = await person.post(
            "/dashboard/signin",
            {
                "email": "ADA@example.com",
                "password": "correct horse battery",
                "next": "https://evil.example/",
            },
        )
        assert right.status_code == 303
        assert right.headers["location"] == "/dashboard/"  # never off the site
        session = person.client.cookies[SESSION_COOKIE]
        assert (await person.get("/dashboard/usage")).status_code == 200
        out = await person.post("/dashboard/signout", {})
        assert out.status_code == 303
        assert SESSION_COOKIE not in person.client.cookies
        # The old session token is dead, not just forgotten by this browser.
        person.client.cookies.set(SESSION_COOKIE, session, path="/dashboard")
        assert (await person.get("/dashboard/usage")).status_code == 303
        async with live.client(session) as api:
            assert (await api.get("/v1/account")).status_code == 401


async def test_sign_in_attempts_for_an_email_are_limited(live: LiveGateway, dev: Visitor) -> None:
    person = visitor(live)
    async with person.client:
        await person.get("/dashboard/signin")
        answers = []
        for _ in range(SIGN_IN_ATTEMPTS_PER_MINUTE + 1):
            response = await person.post(
                "/dashboard/signin", {"email": "ada@example.com", "password": "guess guess"}
            )
            answers.append(response.status_code)
        assert answers == [401] * SIGN_IN_ATTEMPTS_PER_MINUTE + [429]
        assert "Too many sign-in attempts" in person.last_page
        # Even the right password waits now; another email does not.
        right = await person.post(
            "/dashboard/signin", {"email": "ada@example.com", "password": "correct horse battery"}
        )
        assert right.status_code == 429
        other = await person.post(
            "/dashboard/signin", {"email": "nobody@example.com", "password": "whatever it is"}
        )
        assert other.status_code == 401


# -- one account never sees another's ---------------------------------------------------
async def test_a_page_never_shows_another_accounts_data(live: LiveGateway, dev: Visitor) -> None:
    async with live.client(dev.first_key) as api:
        created = await api.post(
            "/v1/conversations",
            json={
                "title": "Ada's secret plans",
                "messages": [{"role": "user", "content": "xyzzy"}],
            },
        )
        assert created.status_code in (200, 201), created.text
        conversation_id = created.json()["id"]
        key_id = (await api.get("/v1/keys")).json()["data"][0]["id"]
    workflow_id = await live.gateway.workflows.start(
        account_id=dev.account_id,
        key_id=None,
        job_id=new_id("job"),
        workflow="chain",
        requested="chain",
        model=MODEL,
        task="Ada's analytical engine notes",
        max_steps=4,
        max_cost_micros=None,
    )
    await live.gateway.workflows.step(
        workflow_id,
        StepRecord(
            index=1,
            name="outline",
            status="succeeded",
            model=MODEL,
            prompt_tokens=12,
            completion_tokens=30,
            cost_micros=7,
            duration_ms=42,
        ),
    )
    mallory = visitor(live)
    async with mallory.client:
        await mallory.sign_up("mallory@example.com")
        for path in (
            f"/dashboard/keys/{key_id}",
            f"/dashboard/conversations/{conversation_id}",
            f"/dashboard/workflows/{workflow_id}",
        ):
            response = await mallory.get(path)
            assert response.status_code == 404, path
            assert "Ada" not in response.text and "xyzzy" not in response.text
            assert response.headers["content-type"].startswith("text/html")
        await mallory.get("/dashboard/keys")
        revoke = await mallory.post(f"/dashboard/keys/{key_id}/revoke", {})
        assert revoke.status_code == 404
        await mallory.get("/dashboard/conversations")
        delete = await mallory.post(f"/dashboard/conversations/{conversation_id}/delete", {})
        assert delete.status_code == 404
        for path in ("/dashboard/keys", "/dashboard/conversations", "/dashboard/workflows"):
            page = (await mallory.get(path)).text
            for theirs in (key_id, conversation_id, workflow_id, "Ada", "ada@example.com"):
                assert theirs not in page, (path, theirs)
    # Ada's things are untouched and hers to see.
    assert await chat(live, dev.first_key) != 401
    page = (await dev.get(f"/dashboard/conversations/{conversation_id}")).text
    assert "Ada&#39;s secret plans" in page and "xyzzy" in page
    page = (await dev.get(f"/dashboard/workflows/{workflow_id}")).text
    assert "Ada&#39;s analytical engine notes" in page
    assert "outline" in page and "42 ms" in page and "$0.000007" in page


# -- developers ---------------------------------------------------------------------------
async def test_configured_defaults_apply_to_the_next_api_call(
    live: LiveGateway, dev: Visitor
) -> None:
    await live.add_sim_device(slots=4)
    async with live.client(dev.first_key) as api:
        key_id = (await api.get("/v1/keys")).json()["data"][0]["id"]
    assert await chat(live, dev.first_key) == 200
    page = await dev.get(f"/dashboard/keys/{key_id}")
    other_model = next(m.id for m in live.gateway.catalog if m.id != MODEL)
    saved = await dev.post(
        f"/dashboard/keys/{key_id}",
        {
            "name": "prod",
            "restrict_models": "on",
            "allowed_models": [other_model],
            "rpm_limit": "",
            "daily_spend_cap_usd": "2.50",
        },
    )
    assert saved.status_code == 303, saved.text
    assert "Saved." in (await dev.get(saved.headers["location"])).text
    assert page.status_code == 200
    assert await chat(live, dev.first_key) == 403  # the model is now off the allow-list
    async with live.client(dev.first_key) as api:
        settings = (await api.get(f"/v1/keys/{key_id}")).json()["settings"]
    assert settings["allowed_models"] == [other_model]
    assert settings["daily_spend_cap_micros"] == 2_500_000
    # A bad value is shown back with its reason and changes nothing.
    await dev.get(f"/dashboard/keys/{key_id}")
    bad = await dev.post(
        f"/dashboard/keys/{key_id}", {"name": "prod", "restrict_models": "off", "rpm_limit": "-3"}
    )
    assert bad.status_code == 400
    assert "Requests per minute must be a whole number" in bad.text
    # Every model again, one request a minute.
    await dev.get(f"/dashboard/keys/{key_id}")
    await dev.post(
        f"/dashboard/keys/{key_id}", {"name": "prod", "restrict_models": "off", "rpm_limit": "1"}
    )
    assert await chat(live, dev.first_key) == 200
    assert await chat(live, dev.first_key) == 429


async def test_auto_memory_turned_on_in_the_dashboard_keeps_the_conversation(
    live: LiveGateway, dev: Visitor
) -> None:
    await live.add_sim_device(slots=2)
    async with live.client(dev.first_key) as api:
        key_id = (await api.get("/v1/keys")).json()["data"][0]["id"]
    await dev.get(f"/dashboard/keys/{key_id}")
    await dev.post(
        f"/dashboard/keys/{key_id}", {"name": "", "restrict_models": "off", "auto_memory": "on"}
    )
    assert "No conversations yet." in (await dev.get("/dashboard/conversations")).text
    assert await chat(live, dev.first_key) == 200
    page = (await dev.get("/dashboard/conversations")).text
    ids = re.findall(r'data-conversation-id="([^"]+)"', page)
    assert len(ids) == 1
    detail = (await dev.get(f"/dashboard/conversations/{ids[0]}")).text
    assert "Say hello" in detail
    # Deleting it from the dashboard deletes it.
    await dev.post(f"/dashboard/conversations/{ids[0]}/delete", {})
    async with live.client(dev.first_key) as api:
        assert (await api.get(f"/v1/conversations/{ids[0]}")).status_code == 404


async def test_usage_page_agrees_with_the_api(live: LiveGateway, dev: Visitor) -> None:
    await live.add_sim_device(slots=2)
    await dev.get("/dashboard/keys")
    second = new_key_of((await dev.post("/dashboard/keys", {"name": "ci", "mode": "live"})).text)
    for key in (dev.first_key, second, second):
        assert await chat(live, key) == 200
    async with live.client(second) as api:
        usage = (await api.get("/v1/usage")).json()
    page = (await dev.get("/dashboard/usage?days=7")).text
    assert re.search(r'id="total-requests">3<', page)
    spent = re.search(r'id="total-cost">([^<]+)<', page)
    assert spent and usage["total_cost_micros"] > 0
    micros = usage["total_cost_micros"]
    assert spent.group(1).startswith(f"${micros // 1_000_000}.")
    assert MODEL in page
    assert page.count("<rect") >= 2  # a bar in each chart
    # The sandbox view is apart.
    sandbox = (await dev.get("/dashboard/usage?mode=test")).text
    assert re.search(r'id="total-requests">0<', sandbox)


async def test_revoking_a_key_from_the_dashboard_stops_it_at_once(
    live: LiveGateway, dev: Visitor
) -> None:
    await live.add_sim_device()
    async with live.client(dev.first_key) as api:
        key_id = (await api.get("/v1/keys")).json()["data"][0]["id"]
    assert await chat(live, dev.first_key) == 200
    await dev.get("/dashboard/keys")
    assert (await dev.post(f"/dashboard/keys/{key_id}/revoke", {})).status_code == 303
    assert await chat(live, dev.first_key) == 401
    assert "revoked" in (await dev.get("/dashboard/keys")).text


async def test_bad_requests_get_a_page_with_the_reason_never_a_500(
    live: LiveGateway, dev: Visitor
) -> None:
    missing = await dev.get("/dashboard/keys/key_doesnotexist")
    assert missing.status_code == 404
    assert "No API key" in missing.text
    token = csrf_of((await dev.get("/dashboard/keys")).text)
    huge = await dev.client.post("/dashboard/keys", data={"csrf": token, "name": "x" * 70_000})
    assert huge.status_code == 413
    json_body = await dev.client.post(
        "/dashboard/keys", content=b'{"name": "x"}', headers={"Content-Type": "application/json"}
    )
    assert json_body.status_code == 400
    long_name = await dev.client.post("/dashboard/keys", data={"csrf": token, "name": "n" * 300})
    assert long_name.status_code == 400
    assert "at most 200 characters" in long_name.text
    no_money = await dev.client.post("/dashboard/credits", data={"csrf": token, "amount_usd": "5"})
    assert no_money.status_code == 503  # no Stripe keys on this gateway
    assert "not configured" in no_money.text


# -- credit through Stripe Checkout ----------------------------------------------------------
@pytest.fixture
def stripe_api() -> Iterator[StripeStandIn]:
    server = StripeStandIn()
    try:
        yield server
    finally:
        server.close()


async def test_add_credit_goes_to_stripe_checkout(
    tmp_path: Path, stripe_api: StripeStandIn
) -> None:
    settings = fast_settings(
        tmp_path, stripe_secret_key=SECRET_KEY, stripe_api_base=stripe_api.base_url
    )
    live = await start_gateway(settings)
    person = visitor(live)
    try:
        await person.sign_up("payer@example.com")
        page = await person.get("/dashboard/")
        assert "Pay with card" in page.text
        bad = await person.post("/dashboard/credits", {"amount_usd": "ten"})
        assert bad.status_code == 400
        assert not stripe_api.requests
        await person.get("/dashboard/")
        response = await person.post("/dashboard/credits", {"amount_usd": "12.50"})
        assert response.status_code == 303
        assert response.headers["location"] == stripe_api.answer["url"]
        (sent,) = stripe_api.requests
        assert sent["form"]["line_items[0][price_data][unit_amount]"] == "1250"
        assert sent["form"]["client_reference_id"] == person.account_id
        back = await person.get("/dashboard/?checkout=success")
        assert "Payment received" in back.text
    finally:
        await person.client.aclose()
        await stop_gateway(live)


# -- providers -------------------------------------------------------------------------------
@pytest.fixture
async def cheap_payouts(tmp_path: Path) -> AsyncIterator[LiveGateway]:
    live = await start_gateway(fast_settings(tmp_path, payout_threshold_micros=1))
    try:
        yield live
    finally:
        await stop_gateway(live)


async def test_provider_sees_each_device_state_earnings_and_payouts(
    cheap_payouts: LiveGateway,
) -> None:
    live = cheap_payouts
    provider = visitor(live)
    developer = visitor(live)
    async with provider.client, developer.client:
        await provider.sign_up("pat@example.com", roles=("provider",))
        await developer.sign_up("dee@example.com")
        assert "No devices yet" in (await provider.get("/dashboard/provider")).text
        token = await provider.register_device("pat's laptop")
        page = (await provider.get("/dashboard/provider")).text
        assert "offline" in page and token not in page  # shown once, then never
        # Long answers: a short one on the cheapest model earns less than a micro-dollar.
        agent = await live.add_sim_device(token=token, slots=2, length=1_500)
        device_id = agent.stats.device_id
        assert device_id is not None
        page = (await provider.get("/dashboard/provider")).text
        assert re.search(rf'data-device-id="{device_id}".*?state online', page, re.S)
        assert MODEL in page

        connection = live.gateway.registry.get(device_id)
        assert connection is not None
        live.gateway.registry.set_paused(connection, True, "on battery")
        page = (await provider.get("/dashboard/provider")).text
        assert "state paused" in page and "on battery" in page
        live.gateway.registry.set_paused(connection, False, None)
        live.gateway.registry.set_warming(connection, frozenset({"qwen2.5-0.5b-instruct-q6_k"}))
        page = (await provider.get("/dashboard/provider")).text
        assert "state warming" in page and "loading qwen2.5-0.5b-instruct-q6_k" in page
        live.gateway.registry.set_warming(connection, frozenset())
        assert connection.state is ConnectionState.READY

        for _ in range(3):
            assert await chat(live, developer.first_key, max_tokens=1_500) == 200
        page = (await provider.get("/dashboard/provider")).text
        earned = re.search(r'id="earned-30d">([^<]+)<', page)
        async with live.client(provider.first_key) as api:
            earnings = (await api.get("/v1/provider/earnings")).json()
        assert earned and earned.group(1) != "$0.00"
        assert earnings["totals"]["jobs"] == 3
        assert earned.group(1) == "$" + earnings["totals"]["earned_usd"].rstrip("0").rstrip(".")

        # Withdraw one micro-dollar, then take the request back.
        await provider.get("/dashboard/provider")
        requested = await provider.post("/dashboard/provider/payouts", {"amount_usd": "0.000001"})
        assert requested.status_code == 303, requested.text
        page = (await provider.get("/dashboard/provider")).text
        assert "state requested" in page
        cancel = re.search(r'action="(/dashboard/provider/payouts/[^"]+/cancel)"', page)
        assert cancel
        assert (await provider.post(cancel.group(1), {})).status_code == 303
        page = (await provider.get("/dashboard/provider")).text
        assert "state cancelled" in page
        too_much = await provider.post("/dashboard/provider/payouts", {"amount_usd": "1000"})
        assert too_much.status_code == 402

        await live.stop_agents()
        deadline = asyncio.get_running_loop().time() + 10
        while live.gateway.registry.get(device_id) is not None:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
        page = (await provider.get("/dashboard/provider")).text
        assert re.search(rf'data-device-id="{device_id}".*?state offline', page, re.S)


async def test_network_page_counts_devices_answers_and_latency(live: LiveGateway) -> None:
    live.gateway.network_status.ttl_s = 0.0
    await live.add_sim_device(slots=2)
    await live.add_sim_device(slots=2)
    _account, key = await live.developer_key()
    for _ in range(4):
        assert await chat(live, key) == 200
    await live.gateway.job_log.flush()
    person = visitor(live)
    async with person.client:
        page = (await person.get("/dashboard/network")).text
    row = re.search(rf'<tr data-model="{MODEL}">(.*?)</tr>', page, re.S)
    assert row
    assert re.search(r'class="num online">2<', row.group(1))
    assert "100.0%" in row.group(1)
    assert re.search(r"\d+ ms", row.group(1))
    assert "of 4" in row.group(1)
