"""Table definitions (SQLAlchemy Core). The schema itself is owned by the Alembic migrations."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
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
    Index("ix_jobs_account_created", "account_id", "created_at"),
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
    Column("kind", String(16), nullable=False),  # top_up | hold | settle | void | expire | payout
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
