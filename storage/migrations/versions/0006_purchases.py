"""Purchases: Telegram Stars payments and Discord entitlements, each seen once.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06

One row per platform charge or entitlement (``key`` unique: a payment delivered twice credits
once), linked to the pack bucket it granted; refunds record what they took back and what was
already spent. Credit ledger kinds gain ``refund`` (a VARCHAR: no schema change).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "purchases",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(200), nullable=False),
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("platform", sa.String(16), nullable=False),
        sa.Column("platform_user_id", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("product", sa.String(32), nullable=False),
        sa.Column("credits", sa.Integer(), nullable=False),
        sa.Column("bucket", sa.String(200), nullable=False),
        sa.Column("tier", sa.String(32), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("refunded_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("clawed_back", sa.Integer(), nullable=False),
        sa.Column("owed", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name="fk_purchases_account_id_accounts"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_purchases"),
        sa.UniqueConstraint("key", name="uq_purchases_key"),
    )
    op.create_index("ix_purchases_account_id", "purchases", ["account_id"])


def downgrade() -> None:
    op.drop_index("ix_purchases_account_id", table_name="purchases")
    op.drop_table("purchases")
