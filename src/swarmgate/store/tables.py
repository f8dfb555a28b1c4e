"""Table definitions (SQLAlchemy Core). The schema itself is owned by the Alembic migrations."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

accounts = Table(
    "accounts",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("email", String(320), unique=True),
    Column("is_developer", Boolean, nullable=False, default=True),
    Column("is_provider", Boolean, nullable=False, default=False),
    # Prepaid credits granted at creation, in micro-dollars; the ledger takes over from here.
    Column("initial_credit_micros", BigInteger, nullable=False, default=0),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("account_id", String(40), ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False),
    Column("digest", String(64), nullable=False, unique=True),
    Column("prefix", String(24), nullable=False),
    Column("name", String(200), nullable=False, default=""),
    Column("mode", String(8), nullable=False),  # live | test
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("last_used_at", DateTime(timezone=True)),
    Column("expires_at", DateTime(timezone=True)),
    Column("revoked_at", DateTime(timezone=True)),
    Index("ix_api_keys_account", "account_id"),
)

devices = Table(
    "devices",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("account_id", String(40), ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False),
    Column("token_digest", String(64), nullable=False, unique=True),
    Column("token_prefix", String(24), nullable=False),
    Column("name", String(200), nullable=False, default=""),
    Column("os", String(200)),
    Column("cpu", String(200)),
    Column("ram_mb", Integer),
    Column("accelerator", String(200)),
    Column("region", String(50)),
    Column("node_version", String(50)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("last_seen_at", DateTime(timezone=True)),
    Column("revoked_at", DateTime(timezone=True)),
    Index("ix_devices_account", "account_id"),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("account_id", String(40), ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False),
    Column("key_id", String(40)),
    Column("kind", String(16), nullable=False),  # chat | inference | async
    Column("model", String(200), nullable=False),
    Column("status", String(16), nullable=False),  # queued | running | completed | failed | cancelled
    Column("stream", Boolean, nullable=False, default=False),
    Column("device_id", String(40)),
    Column("prompt_tokens", Integer),
    Column("completion_tokens", Integer),
    Column("finish_reason", String(16)),
    Column("error_code", String(64)),
    Column("error_message", Text),
    # Only asynchronous jobs keep their request and output: the API returns them later.
    Column("request_json", Text),
    Column("output", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("started_at", DateTime(timezone=True)),
    Column("finished_at", DateTime(timezone=True)),
    Column("latency_ms", Integer),
    Index("ix_jobs_account_created", "account_id", "created_at"),
)

job_attempts = Table(
    "job_attempts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String(40), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("device_id", String(40), nullable=False),
    Column("outcome", String(24), nullable=False),  # succeeded | failed | timeout | gone | cancelled
    Column("error_code", String(64)),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("first_token_ms", Integer),
    Column("duration_ms", Integer, nullable=False),
    Index("ix_job_attempts_job", "job_id"),
)
