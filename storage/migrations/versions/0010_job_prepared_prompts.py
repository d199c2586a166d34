"""Jobs: prompts_json, the (prompt, negative) pairs admission prepared for the model.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07

Admission prepares a request once (styles, blocklist, quality terms, token estimate) and the
worker uses that result instead of preparing the prompt again (issue 22). Rows from before this
migration have none: the worker prepares theirs as it did.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("prompts_json", sa.Text(), nullable=True))


def downgrade() -> None:
    # Plain ALTER on both (SQLite >= 3.35): batch mode's copy of the table would trip the
    # images' foreign key on a database with jobs.
    op.execute("ALTER TABLE jobs DROP COLUMN prompts_json")
