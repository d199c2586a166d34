"""Gallery filters through indexes, and indexes for retention (``atelier db prune``).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06

Styles were filtered with ``LIKE '%,style,%'`` over the comma-joined ``images.styles``, a scan
of a person's whole gallery (p99 54 ms at 100,000 images on PostgreSQL). Now each style of an
image is a row of ``image_styles`` with the gallery's keyset (account, style, created_at, id);
the model filter gets the same keyset on ``images``, and the platform filter (a join through a
person's every job) a ``platform`` column with one too. The backfills walk ``images`` in id
windows of BATCH rows, so no statement holds a large table's worth of rows at once.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BATCH = 10_000


def upgrade() -> None:
    op.add_column(
        "images", sa.Column("platform", sa.String(16), nullable=False, server_default="")
    )
    op.create_table(
        "image_styles",
        sa.Column("image_id", sa.Integer(), nullable=False),
        sa.Column("style", sa.String(100), nullable=False),
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["image_id"], ["images.id"], name="fk_image_styles_image_id_images"
        ),
        sa.ForeignKeyConstraint(
            ["account_id"], ["accounts.id"], name="fk_image_styles_account_id_accounts"
        ),
        sa.PrimaryKeyConstraint("image_id", "style", name="pk_image_styles"),
    )
    _backfill()
    op.create_index(
        "ix_image_styles_gallery",
        "image_styles",
        ["account_id", "style", sa.text("created_at DESC"), sa.text("image_id DESC")],
    )
    for name, column in (("ix_images_model", "model"), ("ix_images_platform", "platform")):
        op.create_index(
            name,
            "images",
            ["account_id", column, sa.text("created_at DESC"), sa.text("id DESC")],
        )
    deleted = sa.text("deleted_at IS NOT NULL")
    op.create_index(
        "ix_images_deleted", "images", ["deleted_at"],
        postgresql_where=deleted, sqlite_where=deleted,
    )
    op.create_index(
        "ix_reservations_status_updated", "reservations", ["status", "updated_at"]
    )
    expired = sa.text("expired_at IS NOT NULL")
    op.create_index(
        "ix_credit_buckets_expired", "credit_buckets", ["expired_at"],
        postgresql_where=expired, sqlite_where=expired,
    )
    op.create_index("ix_credit_ledger_created", "credit_ledger", ["created_at"])


def _backfill() -> None:
    """image_styles from images.styles, images.platform from the job's identity, in windows."""
    conn = op.get_bind()
    top = conn.execute(sa.text("SELECT coalesce(max(id), 0) FROM images")).scalar_one()
    set_platform = sa.text(
        "UPDATE images SET platform = coalesce((SELECT i.platform FROM jobs j "
        "JOIN identities i ON i.id = j.identity_id WHERE j.id = images.job_id), '') "
        "WHERE id > :lo AND id <= :hi"
    )
    styled = sa.text(
        "SELECT id, account_id, styles, created_at FROM images "
        "WHERE id > :lo AND id <= :hi AND styles <> ''"
    )
    insert = sa.text(
        "INSERT INTO image_styles (image_id, style, account_id, created_at) "
        "VALUES (:image_id, :style, :account_id, :created_at)"
    )
    for lo in range(0, top, BATCH):
        window = {"lo": lo, "hi": lo + BATCH}
        conn.execute(set_platform, window)
        rows = [
            {"image_id": i, "style": s, "account_id": a, "created_at": t}
            for i, a, styles, t in conn.execute(styled, window).all()
            for s in dict.fromkeys(x for x in styles.split(",") if x)
        ]
        if rows:
            conn.execute(insert, rows)


def downgrade() -> None:
    op.drop_index("ix_credit_ledger_created", table_name="credit_ledger")
    op.drop_index("ix_credit_buckets_expired", table_name="credit_buckets")
    op.drop_index("ix_reservations_status_updated", table_name="reservations")
    for name in ("ix_images_deleted", "ix_images_platform", "ix_images_model"):
        op.drop_index(name, table_name="images")
    op.drop_index("ix_image_styles_gallery", table_name="image_styles")
    op.drop_table("image_styles")
    # Not batch mode: copying images on SQLite would drop its prompt-search triggers.
    # ALTER TABLE ... DROP COLUMN needs SQLite 3.35 (2021).
    op.execute("ALTER TABLE images DROP COLUMN platform")
