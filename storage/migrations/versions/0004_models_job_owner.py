"""Jobs: owner, the dispatcher (its consumer name) that last started the job.

Revision ID: 0004
Revises: 0002
Create Date: 2026-12-04

A dispatcher restarted under the same name takes its running jobs back at once (start_attempts
with owner=name) instead of waiting for their leases and the broker's claim timeout. Rows from
before this migration have no owner: they are taken back the old way, after their lease.
(Issue 10. Revises 0002 on this branch; chained after 0003_api_keys once both are on main.)
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("owner", sa.String(length=128), nullable=True))


def downgrade() -> None:
    # SQLite drops a column by copying the table; batch mode does that (PostgreSQL: ALTER).
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("owner")
