"""Typed settings, built once from ``SWARMGATE_*`` variables and flags, then injected."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PLACEHOLDER_SECRETS = frozenset({"", "changeme", "change-me", "secret", "admin", "password"})


def default_data_dir() -> Path:
    return Path.home() / ".swarmgate"


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SWARMGATE_", extra="ignore")

    environment: str = "development"  # development | production
    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = Field(default_factory=default_data_dir)
    database_url: str = ""
    admin_token: str = ""
    catalog_path: Path | None = None
    # Trust X-Forwarded-* from a reverse proxy on loopback (off: nothing uses client IPs yet).
    proxy_headers: bool = False

    # request limits
    max_body_bytes: int = 1_000_000
    max_tokens_limit: int = 8192

    # dispatch and failover
    max_retries: int = 5
    retry_backoff_ms: int = 100
    failover_budget_s: float = 15.0
    queue_wait_s: float = 2.0
    first_token_timeout_s: float = 10.0
    token_stall_timeout_s: float = 30.0
    request_timeout_s: float = 300.0

    # device connections
    heartbeat_interval_s: float = 5.0
    heartbeat_timeout_s: float = 20.0
    max_frame_bytes: int = 4_000_000
    warming_retry_after_s: int = 300

    # jobs
    job_log_flush_ms: int = 50
    key_cache_ttl_s: float = 30.0

    @model_validator(mode="after")
    def _check(self) -> GatewaySettings:
        if not self.database_url:
            self.database_url = f"sqlite+aiosqlite:///{self.data_dir / 'swarmgate.db'}"
        if self.environment != "development" and self.admin_token.lower() in PLACEHOLDER_SECRETS:
            raise ValueError(
                "SWARMGATE_ADMIN_TOKEN must be set to a real secret outside development"
            )
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")


class NodeSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SWARMGATE_NODE_", extra="ignore")

    gateway_url: str = "ws://127.0.0.1:8080/v1/nodes/connect"
    token: str = ""
    backend: str = "llama-cpp"
    models: list[str] = Field(default_factory=lambda: ["smollm2-135m-instruct-q4_1"])
    region: str = "local"
    slots: int = 1
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    drain_timeout_s: float = 30.0
    # The device guard (node/guard.py): when the node stops taking new jobs by itself.
    guard: bool = True
    guard_interval_s: float = 15.0
    min_battery_percent: float = 20.0
    max_temperature_c: float | None = None  # None: 45 °C for a battery, 85 °C for a CPU
    charging_only: bool = False
    schedule: str = ""  # serving hours, e.g. "22:00-07:00,12:00-13:00"; empty: any time
    timezone: str = ""  # zoneinfo name the schedule is in; empty: local time
    # Where `swarmgate node register` saves the device token; None: ~/.swarmgate/node.json.
    config_path: Path | None = None
    n_ctx: int = 2048
    n_threads: int | None = None
    openai_base_url: str = "http://127.0.0.1:11434/v1"
    openai_api_key: str = ""
    # Downloaded GGUFs, one folder per model (SWARMGATE_NODE_CACHE_DIR).
    cache_dir: Path = Field(default_factory=lambda: default_data_dir() / "models")
