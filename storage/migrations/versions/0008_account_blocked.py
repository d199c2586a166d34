"""Accounts an operator blocked: ``blocked_at`` and ``blocked_reason``.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07

`atelier account block IDENTITY --reason ...` sets both, `unblock` clears them. A blocked
account is refused at admission (nothing charged) and at a Stars pre-checkout. Two nullable
columns: no rewrite of the table on either database.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("accounts", sa.Column("blocked_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("accounts", sa.Column("blocked_reason", sa.String(300), nullable=True))


def downgrade() -> None:
    # Plain ALTER TABLE ... DROP COLUMN (SQLite 3.35+): a batch copy of ``accounts`` would
    # trip the foreign keys of every table that points at it.
    op.execute("ALTER TABLE accounts DROP COLUMN blocked_reason")
    op.execute("ALTER TABLE accounts DROP COLUMN blocked_at")
