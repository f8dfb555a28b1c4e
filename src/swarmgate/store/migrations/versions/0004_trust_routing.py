"""trust and routing: what the gateway learns about devices, and providers' own prices

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22 10:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as batch:
        for name in (
            "jobs_served",
            "jobs_failed",
            "canaries_passed",
            "canaries_failed",
            "suspicions",
        ):
            batch.add_column(sa.Column(name, sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("last_suspicion", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("suspended_reason", sa.String(length=200), nullable=True))
        batch.add_column(sa.Column("suspended_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("verified_by", sa.String(length=40), nullable=True))
        batch.add_column(sa.Column("verified_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("trust_score", sa.Float(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("engine", sa.String(length=50), nullable=True))
    op.create_table(
        "device_prices",
        sa.Column(
            "device_id",
            sa.String(length=40),
            sa.ForeignKey("devices.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("model", sa.String(length=200), primary_key=True),
        sa.Column("input_per_1m_micros", sa.BigInteger(), nullable=False),
        sa.Column("output_per_1m_micros", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("device_prices")
    with op.batch_alter_table("devices") as batch:
        for name in (
            "engine",
            "trust_score",
            "verified_at",
            "verified_by",
            "suspended_at",
            "suspended_reason",
            "last_suspicion",
            "suspicions",
            "canaries_failed",
            "canaries_passed",
            "jobs_failed",
            "jobs_served",
        ):
            batch.drop_column(name)
