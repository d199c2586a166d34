"""Jobs: delivered_at (the front end confirmed the delivery) and indexes for the dispatcher's scans.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28

A finished job whose delivered_at is NULL is re-announced to its front end until the front end
marks it delivered, so a broker restart without persistence loses no delivery. Jobs finished
before this migration were delivered the old way: they are marked delivered at their finish
time, or the first dispatcher to start would re-announce a day of them.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE jobs SET delivered_at = finished_at WHERE finished_at IS NOT NULL")
    op.create_index("ix_jobs_status_created", "jobs", ["status", "created_at"])
    op.create_index("ix_jobs_delivered_finished", "jobs", ["delivered_at", "finished_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_delivered_finished", table_name="jobs")
    op.drop_index("ix_jobs_status_created", table_name="jobs")
    # SQLite drops a column by copying the table; batch mode does that (PostgreSQL: ALTER).
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("delivered_at")
