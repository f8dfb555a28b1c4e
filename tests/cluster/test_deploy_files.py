"""The compose deployment names only settings the gateway has, and wires what it needs."""

from __future__ import annotations

import re
from pathlib import Path

from swarmgate.config import GatewaySettings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "compose"


def test_every_setting_named_in_the_deployment_exists() -> None:
    fields = {name.upper() for name in GatewaySettings.model_fields}
    named: set[str] = set()
    for path in DEPLOY.iterdir():
        named |= set(re.findall(r"SWARMGATE_([A-Z0-9_]+)", path.read_text()))
    assert {
        "DATABASE_URL",
        "REDIS_URL",
        "GATEWAY_ID",
        "ADMIN_TOKEN",
        "CLUSTER_LINK_PORT",
        "CLUSTER_LINK_HOST",
        "CLUSTER_SECRET",
    } <= named
    assert named - fields == set()


def test_the_proxy_passes_websockets_and_streams() -> None:
    nginx = (DEPLOY / "nginx.conf").read_text()
    assert "proxy_set_header Upgrade $http_upgrade;" in nginx
    assert "proxy_buffering off;" in nginx
    compose = (DEPLOY / "compose.yaml").read_text()
    for service in ("postgres:", "redis:", "gateway-1:", "gateway-2:", "proxy:"):
        assert f"\n  {service}" in compose
