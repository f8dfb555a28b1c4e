"""conversations: stored messages, versioned rolling summaries, auto-memory sessions

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-22 14:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "conversations",
        sa.Column("id", sa.String(length=40), primary_key=True),
        sa.Column(
            "account_id",
            sa.String(length=40),
            sa.ForeignKey("accounts.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("key_id", sa.String(length=40), nullable=True),
        sa.Column("session", sa.String(length=300), nullable=True),
        sa.Column("title", sa.String(length=200), nullable=True),
        sa.Column("title_source", sa.String(length=16), nullable=True),
        sa.Column("system", sa.Text(), nullable=True),
        sa.Column("model", sa.String(length=200), nullable=True),
        sa.Column("message_count", sa.Integer(), nullable=False),
        sa.Column("summary_version", sa.Integer(), nullable=False),
        sa.Column("summarized_through", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_activity_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index(
        "ix_conversations_account_activity", "conversations", ["account_id", "last_activity_at"]
    )
    op.create_index(
        "ix_conversations_session", "conversations", ["key_id", "session", "last_activity_at"]
    )
    op.create_index("ix_conversations_activity", "conversations", ["last_activity_at"])
    op.create_table(
        "conversation_messages",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column(
            "conversation_id",
            sa.String(length=40),
            sa.ForeignKey("conversations.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("tokens", sa.Integer(), nullable=False),
        sa.Column("counted_by", sa.String(length=200), nullable=False),
        sa.Column("job_id", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index(
        "ix_conversation_messages_conversation",
        "conversation_messages",
        ["conversation_id", "id"],
    )
    op.create_table(
        "conversation_summaries",
        sa.Column(
            "conversation_id",
            sa.String(length=40),
            sa.ForeignKey("conversations.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("version", sa.Integer(), primary_key=True),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("tokens", sa.Integer(), nullable=False),
        sa.Column("through_message_id", sa.BigInteger(), nullable=False),
        sa.Column("job_id", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("conversation_summaries")
    op.drop_table("conversation_messages")
    op.drop_table("conversations")
