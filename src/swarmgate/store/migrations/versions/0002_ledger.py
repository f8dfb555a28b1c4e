"""ledger: holds, double-entry transactions and entries, per-book balances

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 09:00:00.000000

Also moves each account's ``initial_credit_micros`` into the ledger as a "welcome"
top-up (external_id = account id, the same key ``create_account`` now uses), so an
existing database keeps its developers' credit after the upgrade.
"""

from __future__ import annotations

import secrets

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "holds",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("account_id", sa.String(length=40), nullable=False),
        sa.Column("amount_micros", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(length=8), nullable=False),
        sa.Column("job_id", sa.String(length=40), nullable=True),
        sa.Column("sandbox", sa.Boolean(), nullable=False),
        sa.Column("charged_micros", sa.BigInteger(), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("resolved_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("amount_micros >= 0", name="ck_holds_amount_non_negative"),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_holds_status_expires", "holds", ["status", "expires_at"])
    op.create_index("ix_holds_account", "holds", ["account_id"])

    op.create_table(
        "ledger_transactions",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("account_id", sa.String(length=40), nullable=False),
        sa.Column("job_id", sa.String(length=40), nullable=True),
        sa.Column("hold_id", sa.String(length=40), nullable=True),
        sa.Column("source", sa.String(length=40), nullable=True),
        sa.Column("external_id", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("memo", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"]),
        sa.ForeignKeyConstraint(["hold_id"], ["holds.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("source", "external_id", name="uq_ledger_transactions_external"),
    )
    op.create_index(
        "ix_ledger_transactions_account_created",
        "ledger_transactions",
        ["account_id", "created_at"],
    )
    op.create_index("ix_ledger_transactions_hold", "ledger_transactions", ["hold_id"])

    op.create_table(
        "ledger_entries",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("transaction_id", sa.String(length=40), nullable=False),
        sa.Column("book", sa.String(length=120), nullable=False),
        sa.Column("amount_micros", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["transaction_id"], ["ledger_transactions.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_ledger_entries_transaction", "ledger_entries", ["transaction_id"])
    op.create_index("ix_ledger_entries_book", "ledger_entries", ["book", "id"])

    op.create_table(
        "balances",
        sa.Column("book", sa.String(length=120), nullable=False),
        sa.Column("amount_micros", sa.BigInteger(), nullable=False),
        sa.CheckConstraint(
            "amount_micros >= 0 OR book LIKE 'external:%'", name="ck_balances_non_negative"
        ),
        sa.PrimaryKeyConstraint("book"),
    )

    _backfill_initial_credits()


def _backfill_initial_credits() -> None:
    """Posts each account's initial credit as a balanced welcome top-up."""
    accounts = sa.table(
        "accounts",
        sa.column("id", sa.String),
        sa.column("initial_credit_micros", sa.BigInteger),
        sa.column("created_at", sa.DateTime(timezone=True)),
    )
    transactions = sa.table(
        "ledger_transactions",
        sa.column("id", sa.String),
        sa.column("kind", sa.String),
        sa.column("account_id", sa.String),
        sa.column("source", sa.String),
        sa.column("external_id", sa.String),
        sa.column("created_at", sa.DateTime(timezone=True)),
        sa.column("memo", sa.Text),
    )
    entries = sa.table(
        "ledger_entries",
        sa.column("transaction_id", sa.String),
        sa.column("book", sa.String),
        sa.column("amount_micros", sa.BigInteger),
    )
    balances = sa.table(
        "balances", sa.column("book", sa.String), sa.column("amount_micros", sa.BigInteger)
    )
    bind = op.get_bind()
    granted = bind.execute(
        sa.select(accounts.c.id, accounts.c.initial_credit_micros, accounts.c.created_at).where(
            accounts.c.initial_credit_micros > 0
        )
    ).all()
    if not granted:
        return
    total = 0
    for account_id, amount, created_at in granted:
        transaction_id = f"txn_{secrets.token_hex(8)}"
        bind.execute(
            transactions.insert().values(
                id=transaction_id,
                kind="top_up",
                account_id=account_id,
                source="welcome",
                external_id=account_id,
                created_at=created_at,
                memo="initial credit, moved from accounts.initial_credit_micros",
            )
        )
        bind.execute(
            entries.insert(),
            [
                {
                    "transaction_id": transaction_id,
                    "book": "external:topups",
                    "amount_micros": -amount,
                },
                {
                    "transaction_id": transaction_id,
                    "book": f"developer:{account_id}",
                    "amount_micros": amount,
                },
            ],
        )
        bind.execute(balances.insert().values(book=f"developer:{account_id}", amount_micros=amount))
        total += amount
    bind.execute(balances.insert().values(book="external:topups", amount_micros=-total))


def downgrade() -> None:
    op.drop_table("balances")
    op.drop_index("ix_ledger_entries_book", table_name="ledger_entries")
    op.drop_index("ix_ledger_entries_transaction", table_name="ledger_entries")
    op.drop_table("ledger_entries")
    op.drop_index("ix_ledger_transactions_hold", table_name="ledger_transactions")
    op.drop_index("ix_ledger_transactions_account_created", table_name="ledger_transactions")
    op.drop_table("ledger_transactions")
    op.drop_index("ix_holds_account", table_name="holds")
    op.drop_index("ix_holds_status_expires", table_name="holds")
    op.drop_table("holds")
