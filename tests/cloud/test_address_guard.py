"""The address guard for developers' own upstream base URLs (table tests, no network)."""

from __future__ import annotations

import pytest

from swarmgate.errors import UpstreamAddressRefused
from swarmgate.upstreams import AddressGuard


class FakeDns:
    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.asked = 0

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked += 1
        if host not in self.answers:
            raise OSError("no such host")
        return self.answers[host]


@pytest.mark.parametrize(
    ("url", "answers", "pinned", "host", "sni"),
    [
        (
            "https://api.example.com/v1/chat/completions",
            {"api.example.com": ["93.184.216.34"]},
            "https://93.184.216.34/v1/chat/completions",
            "api.example.com",
            "api.example.com",
        ),
        (
            "http://api.example.com:8443/v1/chat/completions?x=1",
            {"api.example.com": ["93.184.216.34"]},
            "http://93.184.216.34:8443/v1/chat/completions?x=1",
            "api.example.com:8443",
            None,
        ),
        (
            "https://v6.example.com/v1",
            {"v6.example.com": ["2606:2800:220:1:248:1893:25c8:1946"]},
            "https://[2606:2800:220:1:248:1893:25c8:1946]/v1",
            "v6.example.com",
            "v6.example.com",
        ),
        ("https://8.8.8.8/v1", {}, "https://8.8.8.8/v1", "8.8.8.8", None),
    ],
)
async def test_public_hosts_are_pinned_to_the_checked_address(
    url: str, answers: dict[str, list[str]], pinned: str, host: str, sni: str | None
) -> None:
    guard = AddressGuard(resolver=FakeDns(answers))
    got = await guard.pin(url)
    assert got.url == pinned and got.host == host
    assert got.extensions.get("sni_hostname") == sni


@pytest.mark.parametrize(
    ("url", "answers"),
    [
        ("http://internal.example.com/v1", {"internal.example.com": ["10.0.0.8"]}),
        ("http://127.0.0.1:6379/v1", {}),
        ("http://[::1]/v1", {}),
        ("http://metadata.example.com/v1", {"metadata.example.com": ["169.254.169.254"]}),
        # one private address among public ones is enough to refuse
        ("http://mixed.example.com/v1", {"mixed.example.com": ["93.184.216.34", "192.168.1.9"]}),
        ("http://nowhere.example.com/v1", {}),  # does not resolve
        ("ftp://files.example.com/", {"files.example.com": ["93.184.216.34"]}),
    ],
)
async def test_private_unresolvable_or_odd_urls_are_refused(
    url: str, answers: dict[str, list[str]]
) -> None:
    with pytest.raises(UpstreamAddressRefused):
        await AddressGuard(resolver=FakeDns(answers)).pin(url)


async def test_the_operator_may_allow_private_addresses() -> None:
    guard = AddressGuard(allow_private=True, resolver=FakeDns({"llm.lan": ["192.168.1.9"]}))
    assert (await guard.pin("http://llm.lan:8000/v1")).url == "http://192.168.1.9:8000/v1"


async def test_a_dns_change_is_seen_after_the_cache_expires() -> None:
    now = [0.0]
    dns = FakeDns({"api.example.com": ["93.184.216.34"]})
    guard = AddressGuard(resolver=dns, ttl_s=60, clock=lambda: now[0])
    await guard.pin("https://api.example.com/v1")
    await guard.pin("https://api.example.com/v1")
    assert dns.asked == 1  # cached
    dns.answers["api.example.com"] = ["127.0.0.1"]  # rebinding to loopback
    now[0] = 61
    with pytest.raises(UpstreamAddressRefused):
        await guard.pin("https://api.example.com/v1")
    assert dns.asked == 2
