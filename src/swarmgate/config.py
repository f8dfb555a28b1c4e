"""Typed settings, built once from ``SWARMGATE_*`` variables and flags, then injected."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from swarmgate.upstreams import UpstreamConfig

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
    # A streaming client that takes none of its answer for this long is dropped and its job
    # cancelled: otherwise it could hold a device slot for as long as its socket stays open.
    client_stall_timeout_s: float = 30.0

    # device connections
    heartbeat_interval_s: float = 5.0
    heartbeat_timeout_s: float = 20.0
    max_frame_bytes: int = 4_000_000
    warming_retry_after_s: int = 300
    # Devices whose handshake (token check, profile, hello record) may use the database at
    # once; the rest wait their turn. Below the connection pool's size, so requests always
    # find a connection while thousands of devices reconnect.
    device_handshake_concurrency: int = Field(default=4, ge=1, le=64)

    # routing and trust
    # Providers may price each model on their devices within these shares of the catalog's.
    device_price_min_bps: int = 5_000
    device_price_max_bps: int = 20_000
    # A device reporting more tokens per second than this (over a whole answer) is suspected.
    trust_max_tokens_per_s: float = 5_000.0
    trust_abort_streak: int = 5  # failed jobs in a row that make one suspicion
    attestation_valid_s: float = 7 * 86_400  # an integrity verdict counts this long
    # Known-answer canaries: every this many seconds, each idle device with a reference
    # for one of its models gets one (0: off).
    canary_interval_s: float = 900.0
    canary_max_per_round: int = 50
    # Google Play Integrity (classic flow) for verified devices; off unless set.
    play_integrity_package: str = ""
    play_integrity_decryption_key: str = ""  # base64, from the Play Console
    play_integrity_verification_key: str = ""  # base64 DER public key, from the Play Console
    play_integrity_certificate_digests: list[str] = Field(default_factory=list)

    # cloud upstreams (JSON list of {"name", "base_url", "api_key", "timeout_s"})
    upstreams: list[UpstreamConfig] = Field(default_factory=list)
    # BYOK: a cloud request through the account's own vault key is charged this share of
    # the model's price as the platform's fee.
    byok_fee_bps: int = 1_000
    # The vault's master secret; required outside development (the vault is off without it).
    vault_master_secret: str = Field(default="", repr=False)
    vault_key_version: int = 1  # raise it when rotating the master secret
    # Let developers' base URLs point at private addresses (a gateway on a private network).
    vault_allow_private_urls: bool = False

    # orchestration: steps of a workflow are charged this multiple of the model's price,
    # in basis points (10,000 = 1.0x; the seeds use 1.0x and 1.5x)
    orchestration_rate_bps: int = Field(default=10_000, ge=0, le=100_000)

    # conversation memory
    # Conversations idle this many days are deleted, with their messages (0: kept).
    memory_retention_days: int = Field(default=30, ge=0)
    memory_sweep_interval_s: float = Field(default=3600.0, gt=0)
    # Auto memory: a key's requests join its latest conversation unless it has been idle
    # this long (an X-Session-ID header names the session instead).
    memory_session_idle_s: float = Field(default=1800.0, gt=0)

    # scale-out: several gateways on one PostgreSQL and one Redis (cluster/)
    # Empty: this gateway is alone (in-process presence, limits and idempotency records).
    redis_url: str = ""
    # Every Redis key this gateway writes starts with this (two networks can share a Redis).
    redis_prefix: str = Field(default="sg:", min_length=1, max_length=40)
    # Connections to Redis a gateway opens for commands (besides its pub/sub and publishing
    # connections); a command waits for a free one, at most ``redis_pool_wait_s``.
    redis_max_connections: int = Field(default=32, ge=2, le=10_000)
    redis_pool_wait_s: float = Field(default=5.0, gt=0)
    # This gateway's name among its peers; empty: a random one at each start.
    gateway_id: str = Field(default="", max_length=40, pattern=r"^[A-Za-z0-9_.-]*$")
    # A gateway that has not refreshed its liveness key for this long is taken for dead:
    # its devices leave every other gateway's registry and their attempts fail over.
    cluster_gateway_ttl_s: float = Field(default=5.0, gt=0)
    cluster_liveness_interval_s: float = Field(default=1.0, gt=0)
    # Device presence records expire after this unless refreshed; peers re-read them this often.
    cluster_device_ttl_s: float = Field(default=60.0, gt=0)
    cluster_sync_interval_s: float = Field(default=5.0, gt=0)
    # Direct links between gateways for the attempts that cross them (cluster/links.py):
    # a TCP port of their own (0: none; attempts cross through Redis pub/sub), the host
    # peers reach this gateway at, and a secret every gateway of the network shares.
    cluster_link_port: int = Field(default=0, ge=0, le=65_535)
    cluster_link_bind: str = "0.0.0.0"  # every interface: the other gateways connect
    cluster_link_host: str = ""  # empty: this machine's host name
    cluster_secret: str = ""
    # A credit reservation in Redis lives this long unless its gateway renews it (every
    # third of it while the request runs): a dead gateway's come back within this.
    cluster_reservation_lease_s: float = Field(default=30.0, ge=1.0)

    # tracing: OpenTelemetry spans over OTLP/HTTP, off unless an endpoint is set (needs the
    # `otel` extra). The traces URL itself, e.g. http://collector:4318/v1/traces.
    otel_endpoint: str = ""
    otel_service_name: str = Field(default="swarmgate-gateway", min_length=1)
    # Share of new traces recorded; a caller's traceparent decides for its own trace.
    otel_sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)

    # jobs
    job_log_flush_ms: int = 50
    key_cache_ttl_s: float = 30.0

    # accounts and sign-in
    signup_enabled: bool = True
    welcome_credit_micros: int = 5_000_000  # $5 of credit for every new account
    session_ttl_s: float = 7 * 86_400
    # JWT bearer auth (off unless a JWKS URL or file is set); `sub` maps to an account.
    jwks_url: str = ""
    jwks_file: Path | None = None
    jwt_issuer: str = ""
    jwt_audience: str = ""
    jwks_refresh_s: float = 300.0

    # money: integer micro-dollars everywhere
    # Off only for a private gateway that charges nobody: requests then run without holds.
    billing_enabled: bool = True
    provider_share_bps: int = 8_500  # 85 % of each job to the device's provider
    hold_ttl_s: float = 3_600.0  # ledger holds (queued async jobs) older than this expire
    hold_sweep_interval_s: float = 60.0
    settle_batch_max: int = 512  # charges committed together in one database transaction
    # SQLite: how often settled charges are posted from the journal file to the ledger.
    settle_post_interval_s: float = 0.05
    idempotency_ttl_s: float = 86_400.0
    low_balance_micros: int = 1_000_000  # the low_balance webhook fires below $1
    # providers
    payout_threshold_micros: int = 5_000_000  # a payout can be requested from $5 earned
    provider_welcome_bonus_micros: int = 0
    welcome_bonus_lock_days: int = 30  # the bonus is withdrawable after this many days

    # Stripe top-ups (off unless the keys are set)
    stripe_secret_key: str = ""
    stripe_webhook_secret: str = ""
    stripe_api_base: str = ""  # empty: Stripe's own API
    checkout_success_url: str = "http://127.0.0.1:8080/dashboard/?checkout=success"
    checkout_cancel_url: str = "http://127.0.0.1:8080/dashboard/?checkout=cancel"

    # outgoing webhooks
    webhook_timeout_s: float = 10.0
    webhook_max_attempts: int = 8
    webhook_backoff_s: float = 30.0  # doubled after each failed attempt
    webhook_poll_s: float = 1.0

    @model_validator(mode="after")
    def _check(self) -> GatewaySettings:
        if not self.database_url:
            self.database_url = f"sqlite+aiosqlite:///{self.data_dir / 'swarmgate.db'}"
        if not 0 <= self.provider_share_bps <= 10_000:
            raise ValueError("SWARMGATE_PROVIDER_SHARE_BPS must be 0..10000")
        if self.environment != "development" and self.admin_token.lower() in PLACEHOLDER_SECRETS:
            raise ValueError(
                "SWARMGATE_ADMIN_TOKEN must be set to a real secret outside development"
            )
        if self.environment != "development" and (
            self.vault_master_secret.lower() in PLACEHOLDER_SECRETS
            or len(self.vault_master_secret) < 32
        ):
            raise ValueError(
                "SWARMGATE_VAULT_MASTER_SECRET must be set to a real secret of 32 or more "
                "characters outside development"
            )
        if not 0 <= self.byok_fee_bps <= 10_000:
            raise ValueError("SWARMGATE_BYOK_FEE_BPS must be 0..10000")
        if self.redis_url and self.is_sqlite:
            raise ValueError(
                "SWARMGATE_REDIS_URL needs a shared database: set SWARMGATE_DATABASE_URL to "
                "PostgreSQL (several gateways cannot share one SQLite file)"
            )
        if self.cluster_link_port and len(self.cluster_secret) < 16:
            raise ValueError(
                "SWARMGATE_CLUSTER_LINK_PORT needs SWARMGATE_CLUSTER_SECRET: a secret of 16 or "
                "more characters that every gateway of the network shares"
            )
        if self.cluster_liveness_interval_s * 2 > self.cluster_gateway_ttl_s:
            raise ValueError(
                "SWARMGATE_CLUSTER_GATEWAY_TTL_S must be at least twice "
                "SWARMGATE_CLUSTER_LIVENESS_INTERVAL_S"
            )
        if self.otel_endpoint and not self.otel_endpoint.startswith(("http://", "https://")):
            raise ValueError(
                "SWARMGATE_OTEL_ENDPOINT must be an http(s) URL, such as "
                "http://collector:4318/v1/traces"
            )
        names = [u.name for u in self.upstreams]
        if len(names) != len(set(names)):
            raise ValueError("SWARMGATE_UPSTREAMS has two upstreams with the same name")
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
