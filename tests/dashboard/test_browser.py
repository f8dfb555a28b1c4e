"""The dashboard in a real browser: Debian's chromium, driven by Playwright.

Playwright starts the system's browser by its path; no browser is ever downloaded. The
tests save screenshots of the main pages (``build/screenshots`` or
``$SWARMGATE_SCREENSHOTS``). Without chromium they skip, except under CI=true, where a
missing browser is a failure.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, async_playwright

from tests.conftest import MODEL, LiveGateway

CHROMIUM = Path(os.environ.get("SWARMGATE_CHROMIUM", "/usr/bin/chromium"))
SHOTS = Path(
    os.environ.get(
        "SWARMGATE_SCREENSHOTS", Path(__file__).resolve().parents[2] / "build" / "screenshots"
    )
)
# What this machine's closed network needs: no calls home, no component downloads.
CHROMIUM_ARGS = [
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
PASSWORD = "correct horse battery"
TIMEOUT_MS = 15_000

if not CHROMIUM.exists():
    if os.environ.get("CI") == "true":
        raise RuntimeError(f"no chromium at {CHROMIUM}: scripts/browser.sh installs it")
    pytest.skip(f"no chromium at {CHROMIUM} (scripts/browser.sh)", allow_module_level=True)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as driver:
        instance = await driver.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield instance
        finally:
            await instance.close()


async def new_page(browser: Browser, live: LiveGateway, **options: Any) -> Page:
    context = await browser.new_context(base_url=live.base_url, **options)
    context.set_default_timeout(TIMEOUT_MS)
    return await context.new_page()


async def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 1_000


async def sign_up(page: Page, email: str, *, provider: bool = False) -> str:
    """Signs up through the form; returns the first API key the page shows once."""
    await page.goto("/dashboard/signup")
    await page.fill("input[name=email]", email)
    await page.fill("input[name=password]", PASSWORD)
    if provider:
        await page.uncheck("input[value=developer]")
        await page.check("input[value=provider]")
    await page.click("button[type=submit]")
    await page.wait_for_selector("#new-key")
    secret = (await page.inner_text("#new-key")).strip()
    assert secret.startswith("sg_live_")
    return secret


async def test_sign_up_create_a_key_call_the_api_and_see_the_usage(
    live: LiveGateway, browser: Browser
) -> None:
    await live.add_sim_device(slots=2)
    page = await new_page(browser, live)
    first = await sign_up(page, "ada@example.com")
    assert "Welcome" in await page.inner_text("main")
    await shot(page, "01-signed-up-first-key")

    await page.fill("#create-key input[name=name]", "from the browser")
    await page.click("#create-key button[type=submit]")
    await page.wait_for_selector("#new-key")
    key = (await page.inner_text("#new-key")).strip()
    assert key.startswith("sg_live_") and key != first
    assert await page.locator("#keys tbody tr").count() == 2
    await shot(page, "02-keys")

    answer = await live.sdk(key).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello there"}], max_tokens=8
    )
    assert answer.usage is not None and answer.usage.completion_tokens > 0

    await page.goto("/dashboard/usage")
    assert (await page.inner_text("#total-requests")).strip() == "1"
    assert MODEL in await page.inner_text("#usage-by-model")
    assert await page.locator("svg.chart rect").count() >= 2
    await shot(page, "03-usage")

    await page.goto("/dashboard/")
    balance = (await page.inner_text("#balance")).strip()
    assert balance.startswith("$4.99") or balance.startswith("$5.00")
    await shot(page, "04-overview")

    # Signing out ends the session: the pages send the browser back to sign in.
    await page.click("header button:has-text('Sign out')")
    await page.wait_for_url(re.compile(r".*/dashboard/signin$"))
    await page.goto("/dashboard/keys")
    assert "/dashboard/signin" in page.url


async def test_a_key_default_set_in_the_browser_takes_effect_on_the_api(
    live: LiveGateway, browser: Browser
) -> None:
    await live.add_sim_device(slots=2)
    page = await new_page(browser, live)
    key = await sign_up(page, "grace@example.com")
    await page.click("#keys a:has-text('Configure')")
    await page.check("input[name=auto_memory]")
    await page.fill("input[name=daily_spend_cap_usd]", "3")
    await page.click("#configure button[type=submit]")
    await page.wait_for_selector("#saved")
    assert await page.is_checked("input[name=auto_memory]")
    await shot(page, "05-key-configure")

    sdk = live.sdk(key)
    await sdk.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Remember the number 42"}], max_tokens=8
    )
    await page.goto("/dashboard/conversations")
    rows = page.locator("#conversations tbody tr[data-conversation-id]")
    assert await rows.count() == 1
    await shot(page, "06-conversations")
    await rows.first.locator("a").click()
    await page.wait_for_selector("ol.messages")
    messages = await page.inner_text("ol.messages")
    assert "Remember the number 42" in messages
    await shot(page, "07-conversation")

    # The allow-list set in the browser refuses other models on the API at once.
    await page.goto("/dashboard/keys")
    await page.click("#keys a:has-text('Configure')")
    await page.check("input[name=restrict_models][value=on]")
    await page.check("input[name=allowed_models][value='qwen2.5-0.5b-instruct-q6_k']")
    await page.click("#configure button[type=submit]")
    await page.wait_for_selector("#saved")
    async with live.client(key) as api:
        refused = await api.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
        )
    assert refused.status_code == 403


async def test_a_provider_sees_a_sim_device_come_online_and_earn(
    live: LiveGateway, browser: Browser
) -> None:
    page = await new_page(browser, live)
    await sign_up(page, "pat@example.com", provider=True)
    await page.goto("/dashboard/provider")
    await page.fill("#register-device input[name=name]", "kitchen laptop")
    await page.click("#register-device button[type=submit]")
    await page.wait_for_selector("#device-token")
    token = (await page.inner_text("#device-token")).strip()
    assert token.startswith("sg_dev_")
    await page.goto("/dashboard/provider")
    assert await page.locator("#devices .state.offline").count() == 1

    # The device connects while the page is open: the page notices by itself.
    agent = await live.add_sim_device(token=token, slots=2, length=1_500)
    await page.wait_for_selector("#devices .state.online", timeout=20_000)
    assert MODEL in await page.inner_text("#devices")

    _account, developer_key = await live.developer_key()
    sdk = live.sdk(developer_key)
    for _ in range(3):
        await sdk.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Write a lot"}], max_tokens=1_500
        )
    await page.reload()
    earned = (await page.inner_text("#earned-30d")).strip()
    assert earned.startswith("$") and earned != "$0.00"
    row = page.locator(f"#devices tr[data-device-id='{agent.stats.device_id}']")
    assert (await row.locator(".earned").inner_text()).strip() == earned
    assert "3" in await row.inner_text()
    await shot(page, "08-provider")


async def test_pages_fit_a_phone_screen(live: LiveGateway, browser: Browser) -> None:
    await live.add_sim_device()
    page = await new_page(
        browser, live, viewport={"width": 390, "height": 844}, device_scale_factor=2
    )
    await sign_up(page, "phone@example.com")
    for path, name in (
        ("/dashboard/", "09-phone-overview"),
        ("/dashboard/keys", "10-phone-keys"),
        ("/dashboard/usage", "11-phone-usage"),
        ("/dashboard/provider", "12-phone-provider"),
        ("/dashboard/network", "13-phone-network"),
    ):
        await page.goto(path)
        # Wide tables scroll inside their own box; the page itself never scrolls sideways.
        overflow = await page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, (path, overflow)
        await shot(page, name)
    await asyncio.sleep(0)
