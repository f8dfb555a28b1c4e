"""A dashboard visitor over plain HTTP: signs up through the form, keeps its cookies."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import httpx

from tests.conftest import LiveGateway

_CSRF = re.compile(r'name="csrf" value="([^"]+)"')
_SECRET = re.compile(r'<code id="new-key" class="secret-value">([^<]+)</code>')
_DEVICE_TOKEN = re.compile(r'<code id="device-token" class="secret-value">([^<]+)</code>')


def csrf_of(page: str) -> str:
    found = _CSRF.search(page)
    assert found, "the page has no form token"
    return found.group(1)


@dataclass
class Visitor:
    """One browser's worth of state: a cookie jar and the page it last loaded."""

    client: httpx.AsyncClient
    account_id: str = ""
    first_key: str = ""
    last_page: str = ""

    async def get(self, path: str, **kwargs: Any) -> httpx.Response:
        response = await self.client.get(path, **kwargs)
        self.last_page = response.text
        return response

    async def post(self, path: str, data: dict[str, Any], **kwargs: Any) -> httpx.Response:
        """Posts a form with the CSRF token of the last page loaded."""
        fields = {"csrf": csrf_of(self.last_page), **data}
        response = await self.client.post(path, data=fields, **kwargs)
        self.last_page = response.text
        return response

    async def sign_up(self, email: str, roles: tuple[str, ...] = ("developer",)) -> None:
        await self.get("/dashboard/signup")
        response = await self.post(
            "/dashboard/signup",
            {"email": email, "password": "correct horse battery", "roles": list(roles)},
        )
        assert response.status_code == 201, response.text
        secret = _SECRET.search(response.text)
        assert secret, "the first key is shown after sign-up"
        self.first_key = secret.group(1)
        account = await self.client.get(
            "/v1/account", headers={"Authorization": f"Bearer {self.first_key}"}
        )
        self.account_id = account.json()["id"]

    async def register_device(self, name: str = "laptop") -> str:
        await self.get("/dashboard/provider")
        response = await self.post("/dashboard/provider/devices", {"name": name})
        assert response.status_code == 201, response.text
        token = _DEVICE_TOKEN.search(response.text)
        assert token
        return token.group(1)


def visitor(live: LiveGateway) -> Visitor:
    return Visitor(httpx.AsyncClient(base_url=live.base_url, timeout=30, follow_redirects=False))


def new_key_of(page: str) -> str:
    found = _SECRET.search(page)
    assert found, "no key secret on the page"
    return found.group(1)
