"""``swarmgate simulate``: many ``sim`` devices in one process, for demos, load and fault tests."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import Any

import httpx

from swarmgate.node.agent import NodeAgent
from swarmgate.node.backends.sim import SimBackend, SimConfig
from swarmgate.protocol import DeviceFacts

log = logging.getLogger("swarmgate.simulate")

# Named device behaviours for --mix; each adjusts the base sim options.
PROFILES: dict[str, dict[str, Any]] = {
    "healthy": {},
    "slow": {"ttft_ms": 400.0, "tokens_per_s": 25.0},
    "flaky": {"fail_rate": 0.3},
    "dying": {"die_after_tokens": 3},
    "hanging": {"hang": True},
    # Claims the model it is asked for, answers as another: canaries catch it.
    "liar": {"serve_as": "liar/other-model"},
}


def parse_mix(mix: str, devices: int) -> list[str]:
    """'healthy=3,hanging=1' → profile per device; no mix means every device is healthy."""
    if not mix:
        return ["healthy"] * devices
    profiles: list[str] = []
    for part in mix.split(","):
        name, _, count = part.partition("=")
        name = name.strip()
        if name not in PROFILES:
            raise ValueError(f"unknown profile {name!r}; known: {', '.join(PROFILES)}")
        profiles.extend([name] * int(count or 1))
    return profiles


def ws_url(gateway: str) -> str:
    base = gateway.rstrip("/")
    if base.startswith("http"):
        base = "ws" + base[4:]
    return base + "/v1/nodes/connect"


async def register_devices(gateway: str, admin_token: str, count: int) -> list[str]:
    headers = {"Authorization": f"Bearer {admin_token}"}
    async with httpx.AsyncClient(base_url=gateway, headers=headers, timeout=30) as client:
        response = await client.post(
            "/admin/accounts", json={"name": "simulated provider", "provider": True}
        )
        response.raise_for_status()
        account_id = response.json()["id"]
        tokens = []
        for i in range(count):
            response = await client.post(
                "/admin/devices", json={"account_id": account_id, "name": f"sim-{i}"}
            )
            response.raise_for_status()
            tokens.append(response.json()["token"])
    return tokens


def build_agents(
    tokens: list[str],
    profiles: list[str],
    gateway: str,
    model: str,
    sim_options: dict[str, Any],
    slots: int,
) -> list[NodeAgent]:
    base = SimConfig(**{k: v for k, v in sim_options.items() if v is not None})
    agents = []
    for i, (token, profile) in enumerate(zip(tokens, profiles, strict=True)):
        config = replace(base, rng_seed=i, **PROFILES[profile])
        agents.append(
            NodeAgent(
                gateway_url=ws_url(gateway),
                token=token,
                backend=SimBackend(config),
                models=[model],
                slots=slots,
                region=f"sim-{profile}",
                facts=DeviceFacts(os="sim", cpu=f"sim {profile}", ram_mb=1024),
                reconnect_min_s=0.2,
                reconnect_max_s=2.0,
            )
        )
    return agents


async def run_simulation(
    *,
    gateway: str,
    admin_token: str,
    devices: int,
    model: str,
    mix: str,
    sim_options: dict[str, Any],
    slots: int = 1,
    stop: asyncio.Event | None = None,
) -> int:
    profiles = parse_mix(mix, devices)
    tokens = await register_devices(gateway, admin_token, len(profiles))
    agents = build_agents(tokens, profiles, gateway, model, sim_options, slots)
    if stop is None:
        from swarmgate.cli import _stop_event

        stop = _stop_event()
    counts = {p: profiles.count(p) for p in dict.fromkeys(profiles)}
    log.info("running %d simulated devices: %s", len(agents), counts)
    await asyncio.gather(*(agent.run(stop) for agent in agents))
    return 0
