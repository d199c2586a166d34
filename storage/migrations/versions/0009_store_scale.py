"""Indexes for the store at a community's size: the live credit buckets and the job queue.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07

Both are partial, so they hold only what the hot paths look for, however large the tables
grow. ``ix_credit_buckets_live`` (account, id) of buckets not yet expired: a balance, a
reserve and the daily grant read and lock an account's live buckets (two or three) instead of
every bucket it ever had (a daily one per active day). ``ix_jobs_in_flight`` (created_at, id)
of queued and running jobs: the reconciler and a restarted front end walk the queue oldest
first and stop at their limit, and count it from the index alone. (Chained after
0008_account_blocked.)
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LIVE = sa.text("expired_at IS NULL")
IN_FLIGHT = sa.text("status IN ('queued', 'running')")


def upgrade() -> None:
    op.create_index(
        "ix_credit_buckets_live", "credit_buckets", ["account_id", "id"],
        postgresql_where=LIVE, sqlite_where=LIVE,
    )
    op.create_index(
        "ix_jobs_in_flight", "jobs", ["created_at", "id"],
        postgresql_where=IN_FLIGHT, sqlite_where=IN_FLIGHT,
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_in_flight", table_name="jobs")
    op.drop_index("ix_credit_buckets_live", table_name="credit_buckets")
