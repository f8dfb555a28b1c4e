"""jobs by model and time: the public network status reads each model's recent jobs

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 13:00:00.000000
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_jobs_model_created", "jobs", ["model", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_model_created", table_name="jobs")
