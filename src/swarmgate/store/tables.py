"""Table definitions (SQLAlchemy Core). The schema itself is owned by the Alembic migrations."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
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
    # argon2id hash for sign-in over the API; null for accounts made by an admin or via JWT.
    Column("password_hash", String(200)),
)

# Dashboard sessions from sign-in: an opaque token, stored as its SHA-256 digest.
sessions = Table(
    "sessions",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("account_id", String(40), ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False),
    Column("digest", String(64), nullable=False, unique=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("revoked_at", DateTime(timezone=True)),
    Index("ix_sessions_account", "account_id"),
)

# A JWT subject (per issuer) mapped to the account it signs in as.
account_identities = Table(
    "account_identities",
    metadata,
    Column("issuer", String(400), primary_key=True),
    Column("subject", String(400), primary_key=True),
    Column("account_id", String(40), ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False),
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
    # Per-key settings; null means "no limit" / "every model".
    Column("rpm_limit", Integer),
    Column("tpm_limit", Integer),
    Column("daily_spend_cap_micros", BigInteger),
    Column("allowed_models", Text),  # JSON list of model ids
    Column("auto_memory", Boolean, nullable=False, default=False),
    Column("auto_orchestration", Boolean, nullable=False, default=False),
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
    # What routing and trust learned (routing/profile.py, trust/book.py).
    Column("engine", String(50)),
    Column("jobs_served", Integer, nullable=False, default=0, server_default="0"),
    Column("jobs_failed", Integer, nullable=False, default=0, server_default="0"),
    Column("canaries_passed", Integer, nullable=False, default=0, server_default="0"),
    Column("canaries_failed", Integer, nullable=False, default=0, server_default="0"),
    Column("suspicions", Integer, nullable=False, default=0, server_default="0"),
    Column("last_suspicion", String(64)),
    Column("suspended_reason", String(200)),
    Column("suspended_at", DateTime(timezone=True)),
    Column("verified_by", String(40)),  # play_integrity | admin | ...
    Column("verified_at", DateTime(timezone=True)),
    Column("trust_score", Float, nullable=False, default=0.0, server_default="0"),
    Index("ix_devices_account", "account_id"),
)

# Developers' own upstream API keys, sealed (vault/crypto.py): never stored in clear.
vault_keys = Table(
    "vault_keys",
    metadata,
    Column(
        "account_id", String(40), ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True
    ),
    Column("provider", String(64), primary_key=True),
    Column("ciphertext", LargeBinary, nullable=False),
    Column("nonce", LargeBinary, nullable=False),
    Column("salt", LargeBinary, nullable=False),
    Column("iterations", Integer, nullable=False),
    Column("key_version", Integer, nullable=False),
    Column("last4", String(4), nullable=False),
    Column("base_url", String(500)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

# A provider's own price for a model on one device, within the gateway's bounds.
device_prices = Table(
    "device_prices",
    metadata,
    Column("device_id", String(40), ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True),
    Column("model", String(200), primary_key=True),
    Column("input_per_1m_micros", BigInteger, nullable=False),
    Column("output_per_1m_micros", BigInteger, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("account_id", String(40), ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False),
    Column("key_id", String(40)),
    Column("kind", String(16), nullable=False),  # chat | inference | async
    Column("model", String(200), nullable=False),
    Column(
        "status", String(16), nullable=False
    ),  # queued | running | completed | failed | cancelled
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
    # Asynchronous jobs hold their credit in the ledger while queued (holds.id).
    Column("hold_id", String(40)),
    Index("ix_jobs_account_created", "account_id", "created_at"),
    Index("ix_jobs_model_created", "model", "created_at"),
)

job_attempts = Table(
    "job_attempts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("job_id", String(40), ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("device_id", String(40), nullable=False),
    Column(
        "outcome", String(24), nullable=False
    ),  # succeeded | failed | timeout | gone | cancelled
    Column("error_code", String(64)),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("first_token_ms", Integer),
    Column("duration_ms", Integer, nullable=False),
    Index("ix_job_attempts_job", "job_id"),
)


# -- the ledger: double-entry bookkeeping in integer micro-dollars ----------------------
# A *book* is a named pot of money ("developer:<acct>", "holds:<acct>", "provider:<acct>",
# "platform:revenue", "external:topups", ...). Every ledger transaction has entries that
# sum to zero, so money only ever moves between books; ``balances`` keeps each book's
# running total, updated in the same database transaction as its entries.

holds = Table(
    "holds",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("account_id", String(40), ForeignKey("accounts.id"), nullable=False),
    Column("amount_micros", BigInteger, nullable=False),
    Column("status", String(8), nullable=False),  # open | settled | voided | expired
    # No foreign key: a hold is taken before the job row is written.
    Column("job_id", String(40)),
    Column("sandbox", Boolean, nullable=False, default=False),
    # What settlement charged (at most amount_micros); null until settled.
    Column("charged_micros", BigInteger),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("resolved_at", DateTime(timezone=True)),
    CheckConstraint("amount_micros >= 0", name="ck_holds_amount_non_negative"),
    Index("ix_holds_status_expires", "status", "expires_at"),
    Index("ix_holds_account", "account_id"),
)

ledger_transactions = Table(
    "ledger_transactions",
    metadata,
    Column("id", String(40), primary_key=True),
    # top_up | hold | settle | void | expire | payout | payout_request | payout_return |
    # payout_paid | provider_bonus
    Column("kind", String(16), nullable=False),
    # Whose money moved: the developer (top-ups, holds) or the provider (payouts).
    Column("account_id", String(40), ForeignKey("accounts.id"), nullable=False),
    Column("job_id", String(40)),
    Column("hold_id", String(40), ForeignKey("holds.id")),
    Column("source", String(40)),  # where a top-up came from: welcome | admin | stripe ...
    # The payment processor's event id: a replayed webhook must not credit twice.
    Column("external_id", String(200)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("memo", Text),
    UniqueConstraint("source", "external_id", name="uq_ledger_transactions_external"),
    Index("ix_ledger_transactions_account_created", "account_id", "created_at"),
    Index("ix_ledger_transactions_hold", "hold_id"),
)

ledger_entries = Table(
    "ledger_entries",
    metadata,
    # BIGINT on PostgreSQL; SQLite's autoincrement needs INTEGER (its 64-bit rowid).
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column("transaction_id", String(40), ForeignKey("ledger_transactions.id"), nullable=False),
    Column("book", String(120), nullable=False),
    Column("amount_micros", BigInteger, nullable=False),  # signed: + into the book, - out
    Index("ix_ledger_entries_transaction", "transaction_id"),
    Index("ix_ledger_entries_book", "book", "id"),
)

balances = Table(
    "balances",
    metadata,
    Column("book", String(120), primary_key=True),
    Column("amount_micros", BigInteger, nullable=False, default=0),
    # Only the outside world ("external:*") may go negative: it is where money comes from.
    # The ledger's guarded UPDATEs refuse first; this is the last line of defence.
    CheckConstraint(
        "amount_micros >= 0 OR book LIKE 'external:%'", name="ck_balances_non_negative"
    ),
)


# One row per settled job: the durable usage record behind /v1/usage and providers'
# earnings, written in the same database transaction as the charge's ledger entries.
charges = Table(
    "charges",
    metadata,
    Column("job_id", String(40), primary_key=True),  # a job is charged once
    Column("account_id", String(40), ForeignKey("accounts.id"), nullable=False),
    Column("key_id", String(40)),
    Column("sandbox", Boolean, nullable=False, default=False),
    Column("model", String(200), nullable=False),
    Column("device_id", String(40)),
    Column("provider_account_id", String(40)),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("cost_micros", BigInteger, nullable=False),
    Column("provider_micros", BigInteger, nullable=False),
    Column("platform_micros", BigInteger, nullable=False),
    Column("transaction_id", String(40), ForeignKey("ledger_transactions.id"), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_charges_account_created", "account_id", "created_at"),
    Index("ix_charges_provider_created", "provider_account_id", "created_at"),
)

# Charges settled but not yet posted to the ledger (SQLite group commit, see
# billing/settlement.py): a charge is durable here first, then posted in bulk.
charge_journal = Table(
    "charge_journal",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("body", Text, nullable=False),  # the charge as JSON
    # Set when the ledger refused to post it (kept for an operator, never dropped).
    Column("failed_at", DateTime(timezone=True)),
    Column("error", Text),
)

# Idempotency-Key: the first response to a (account, key) pair, replayed for 24 hours.
idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("account_id", String(40), primary_key=True),
    Column("key", String(255), primary_key=True),
    Column("request_hash", String(64), nullable=False),  # method, path and body digest
    Column("status", String(12), nullable=False),  # in_progress | done
    Column("response_status", Integer),
    Column("response_headers", Text),  # JSON object
    Column("response_body", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Index("ix_idempotency_keys_expires", "expires_at"),
)

# Provider payouts: requested -> approved -> paid, or rejected / cancelled.
payouts = Table(
    "payouts",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("account_id", String(40), ForeignKey("accounts.id"), nullable=False),
    Column("amount_micros", BigInteger, nullable=False),
    Column("status", String(12), nullable=False),
    Column("destination", String(400)),
    Column("note", Text),
    Column("transaction_id", String(40), ForeignKey("ledger_transactions.id")),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("decided_at", DateTime(timezone=True)),
    Column("paid_at", DateTime(timezone=True)),
    CheckConstraint("amount_micros > 0", name="ck_payouts_amount_positive"),
    Index("ix_payouts_account_created", "account_id", "created_at"),
    Index("ix_payouts_status", "status"),
)

# Outgoing webhooks: where an account wants events sent, and every delivery attempt.
webhook_endpoints = Table(
    "webhook_endpoints",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("account_id", String(40), ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False),
    Column("url", String(2000), nullable=False),
    # The signing secret: it must be readable to sign, and is shown to its owner once.
    Column("secret", String(100), nullable=False),
    Column("events", Text, nullable=False),  # JSON list of event types
    # usage.threshold fires once a calendar month when the account's spend passes this.
    Column("usage_threshold_micros", BigInteger),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("disabled_at", DateTime(timezone=True)),
    Index("ix_webhook_endpoints_account", "account_id"),
)

webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("id", String(40), primary_key=True),
    Column(
        "endpoint_id",
        String(40),
        ForeignKey("webhook_endpoints.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("event_id", String(40), nullable=False),
    Column("event_type", String(64), nullable=False),
    Column("payload", Text, nullable=False),
    Column("status", String(12), nullable=False),  # pending | delivered | failed
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", DateTime(timezone=True)),
    Column("last_status_code", Integer),
    Column("last_error", Text),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("delivered_at", DateTime(timezone=True)),
    UniqueConstraint("endpoint_id", "event_id", name="uq_webhook_deliveries_event"),
    Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
)

# Conversation memory (memory/): stored at the developer's request, deleted for real.
conversations = Table(
    "conversations",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("account_id", String(40), ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False),
    Column("key_id", String(40)),  # the key that created it
    # Auto memory: "auto" for the key's inactivity-split sessions, "x:<X-Session-ID>" for
    # explicit ones; null for conversations created over the API.
    Column("session", String(300)),
    Column("title", String(200)),
    Column("title_source", String(16)),  # user | model | fallback
    Column("system", Text),  # the system prompt of requests that bring none
    Column("model", String(200)),  # the model of the latest exchange
    Column("message_count", Integer, nullable=False, default=0),
    Column("summary_version", Integer, nullable=False, default=0),
    # The id of the newest message folded into the summary (0: none).
    Column("summarized_through", BigInteger, nullable=False, default=0),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("last_activity_at", DateTime(timezone=True), nullable=False),
    Index("ix_conversations_account_activity", "account_id", "last_activity_at"),
    Index("ix_conversations_session", "key_id", "session", "last_activity_at"),
    Index("ix_conversations_activity", "last_activity_at"),
)

conversation_messages = Table(
    "conversation_messages",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column(
        "conversation_id",
        String(40),
        ForeignKey("conversations.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("role", String(16), nullable=False),
    Column("content", Text, nullable=False),
    Column("tokens", Integer, nullable=False),
    Column("counted_by", String(200), nullable=False),  # the tokenizer behind ``tokens``
    Column("job_id", String(64)),  # the request that added it
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_conversation_messages_conversation", "conversation_id", "id"),
)

# Every version of a conversation's rolling summary; the conversation names the current.
conversation_summaries = Table(
    "conversation_summaries",
    metadata,
    Column(
        "conversation_id",
        String(40),
        ForeignKey("conversations.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("version", Integer, primary_key=True),
    Column("content", Text, nullable=False),
    Column("tokens", Integer, nullable=False),
    Column("through_message_id", BigInteger, nullable=False),
    Column("job_id", String(64)),  # the model job that wrote it
    Column("created_at", DateTime(timezone=True), nullable=False),
)

# Orchestration runs (workflows/): what ran, what it cost. No prompt or answer text is
# kept, only the start of the task, as the run's label.
workflow_runs = Table(
    "workflow_runs",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("account_id", String(40), ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False),
    Column("key_id", String(40)),
    Column("job_id", String(64), nullable=False),  # the chat completion's id
    Column("workflow", String(32), nullable=False),
    Column("requested", String(32), nullable=False),  # what the request asked (auto, ...)
    Column("model", String(200), nullable=False),
    Column(
        "status", String(16), nullable=False
    ),  # running | completed | stopped | failed | tool_calls
    Column("stop_reason", String(32)),
    Column("task", String(200), nullable=False),
    Column("max_steps", Integer, nullable=False),
    Column("max_cost_micros", BigInteger),
    Column("steps_executed", Integer, nullable=False, default=0),
    Column("total_cost_micros", BigInteger, nullable=False, default=0),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True)),
    Index("ix_workflow_runs_account_created", "account_id", "created_at"),
)

workflow_steps = Table(
    "workflow_steps",
    metadata,
    Column(
        "run_id",
        String(40),
        ForeignKey("workflow_runs.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("step", Integer, primary_key=True),
    Column("name", String(64), nullable=False),
    Column("status", String(16), nullable=False),  # succeeded | failed
    Column("tool", String(64)),
    Column("model", String(200)),
    Column("device_id", String(64)),
    Column("job_id", String(64)),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("cost_micros", BigInteger, nullable=False),
    Column("duration_ms", Integer, nullable=False),
    Column("error_code", String(64)),
    Column("finished_at", DateTime(timezone=True), nullable=False),
)
