"""accounts and money: sign-in, sessions, key settings, charges, idempotency, payouts, webhooks

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 09:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def _timestamp(name: str, nullable: bool = True) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    with op.batch_alter_table("accounts") as batch:
        batch.add_column(sa.Column("password_hash", sa.String(length=200), nullable=True))
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("rpm_limit", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("tpm_limit", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("daily_spend_cap_micros", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("allowed_models", sa.Text(), nullable=True))
        batch.add_column(
            sa.Column("auto_memory", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch.add_column(
            sa.Column("auto_orchestration", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("hold_id", sa.String(length=40), nullable=True))

    op.create_table(
        "sessions",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("account_id", sa.String(length=40), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        _timestamp("created_at", nullable=False),
        _timestamp("expires_at", nullable=False),
        _timestamp("revoked_at"),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("digest"),
    )
    op.create_index("ix_sessions_account", "sessions", ["account_id"])

    op.create_table(
        "account_identities",
        sa.Column("issuer", sa.String(length=400), nullable=False),
        sa.Column("subject", sa.String(length=400), nullable=False),
        sa.Column("account_id", sa.String(length=40), nullable=False),
        _timestamp("created_at", nullable=False),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("issuer", "subject"),
    )

    op.create_table(
        "charges",
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("account_id", sa.String(length=40), nullable=False),
        sa.Column("key_id", sa.String(length=40), nullable=True),
        sa.Column("sandbox", sa.Boolean(), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("device_id", sa.String(length=40), nullable=True),
        sa.Column("provider_account_id", sa.String(length=40), nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("cost_micros", sa.BigInteger(), nullable=False),
        sa.Column("provider_micros", sa.BigInteger(), nullable=False),
        sa.Column("platform_micros", sa.BigInteger(), nullable=False),
        sa.Column("transaction_id", sa.String(length=40), nullable=False),
        _timestamp("created_at", nullable=False),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"]),
        sa.ForeignKeyConstraint(["transaction_id"], ["ledger_transactions.id"]),
        sa.PrimaryKeyConstraint("job_id"),
    )
    op.create_index("ix_charges_account_created", "charges", ["account_id", "created_at"])
    op.create_index("ix_charges_provider_created", "charges", ["provider_account_id", "created_at"])

    op.create_table(
        "charge_journal",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        _timestamp("failed_at"),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("seq"),
    )

    op.create_table(
        "idempotency_keys",
        sa.Column("account_id", sa.String(length=40), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=12), nullable=False),
        sa.Column("response_status", sa.Integer(), nullable=True),
        sa.Column("response_headers", sa.Text(), nullable=True),
        sa.Column("response_body", sa.Text(), nullable=True),
        _timestamp("created_at", nullable=False),
        _timestamp("expires_at", nullable=False),
        sa.PrimaryKeyConstraint("account_id", "key"),
    )
    op.create_index("ix_idempotency_keys_expires", "idempotency_keys", ["expires_at"])

    op.create_table(
        "payouts",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("account_id", sa.String(length=40), nullable=False),
        sa.Column("amount_micros", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(length=12), nullable=False),
        sa.Column("destination", sa.String(length=400), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("transaction_id", sa.String(length=40), nullable=True),
        _timestamp("created_at", nullable=False),
        _timestamp("decided_at"),
        _timestamp("paid_at"),
        sa.CheckConstraint("amount_micros > 0", name="ck_payouts_amount_positive"),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"]),
        sa.ForeignKeyConstraint(["transaction_id"], ["ledger_transactions.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_payouts_account_created", "payouts", ["account_id", "created_at"])
    op.create_index("ix_payouts_status", "payouts", ["status"])

    op.create_table(
        "webhook_endpoints",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("account_id", sa.String(length=40), nullable=False),
        sa.Column("url", sa.String(length=2000), nullable=False),
        sa.Column("secret", sa.String(length=100), nullable=False),
        sa.Column("events", sa.Text(), nullable=False),
        sa.Column("usage_threshold_micros", sa.BigInteger(), nullable=True),
        _timestamp("created_at", nullable=False),
        _timestamp("disabled_at"),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_webhook_endpoints_account", "webhook_endpoints", ["account_id"])

    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("endpoint_id", sa.String(length=40), nullable=False),
        sa.Column("event_id", sa.String(length=40), nullable=False),
        sa.Column("event_type", sa.String(length=64), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=12), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        _timestamp("next_attempt_at"),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        _timestamp("created_at", nullable=False),
        _timestamp("delivered_at"),
        sa.ForeignKeyConstraint(["endpoint_id"], ["webhook_endpoints.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("endpoint_id", "event_id", name="uq_webhook_deliveries_event"),
    )
    op.create_index(
        "ix_webhook_deliveries_due", "webhook_deliveries", ["status", "next_attempt_at"]
    )


def downgrade() -> None:
    for index, table in (
        ("ix_webhook_deliveries_due", "webhook_deliveries"),
        ("ix_webhook_endpoints_account", "webhook_endpoints"),
        ("ix_payouts_status", "payouts"),
        ("ix_payouts_account_created", "payouts"),
        ("ix_idempotency_keys_expires", "idempotency_keys"),
        ("ix_charges_provider_created", "charges"),
        ("ix_charges_account_created", "charges"),
        ("ix_sessions_account", "sessions"),
    ):
        op.drop_index(index, table_name=table)
    for table in (
        "webhook_deliveries",
        "webhook_endpoints",
        "payouts",
        "idempotency_keys",
        "charge_journal",
        "charges",
        "account_identities",
        "sessions",
    ):
        op.drop_table(table)
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("hold_id")
    with op.batch_alter_table("api_keys") as batch:
        for column in (
            "auto_orchestration",
            "auto_memory",
            "allowed_models",
            "daily_spend_cap_micros",
            "tpm_limit",
            "rpm_limit",
        ):
            batch.drop_column(column)
    with op.batch_alter_table("accounts") as batch:
        batch.drop_column("password_hash")
