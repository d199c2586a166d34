"""API keys: per-identity keys for the REST API (/api/v1) and the A1111 API (/sdapi/v1).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04

Only a key's sha256 is stored; ``prefix`` (its public first part) finds the row and is what
listings show. ``model`` is the checkpoint an A1111 client chose through POST /sdapi/v1/options.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("identity_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("model", sa.String(100), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["identity_id"], ["identities.id"], name="fk_api_keys_identity_id_identities"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
        sa.UniqueConstraint("prefix", name="uq_api_keys_prefix"),
    )
    op.create_index("ix_api_keys_identity_id", "api_keys", ["identity_id"])


def downgrade() -> None:
    op.drop_index("ix_api_keys_identity_id", table_name="api_keys")
    op.drop_table("api_keys")
