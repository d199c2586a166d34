"""SQLModel tables, one small class per entity; read shapes live in the repository modules.
Timestamps are aware UTC datetimes in Python on both databases (see ``UTCDateTime``)."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Index,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy import DateTime as SADateTime
from sqlalchemy import Enum as SAEnum
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel, col

from core.jobs import JobStatus


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out; SQLite stores them naive (its DATETIME has no zone)."""

    impl = SADateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value.isoformat()} given; use an aware UTC datetime")
        value = value.astimezone(UTC)
        # SQLite compares the stored text, so every value must be written in one zone, naive.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# Named constraints, so that later batch migrations on SQLite can find and drop them.
SQLModel.metadata.naming_convention = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
# Created by the migrations only (dialect specific): skipped when comparing models to the schema.
FTS_TABLE = "images_fts"  # until 0011 (prompt words of every account, one FTS5 index)
# Since 0011: FTS5 over storage.words.account_words (each word keyed by its account).
SQLITE_WORDS_TABLE = "images_words"
PG_PROMPT_INDEX = "ix_images_prompt_fts"
# 0007 (with btree_gin): prompt words and account, apart; PG_PROMPT_INDEX where absent.
PG_SEARCH_INDEX = "ix_images_search"
# Since 0011: each prompt word keyed by its account ('42:fox'), through this function.
PG_WORDS_INDEX = "ix_images_words"
PG_WORDS_FUNCTION = "atelier_account_words"


def utcnow() -> datetime:
    return datetime.now(UTC)


def _enum(enum_cls: type[StrEnum], name: str, **kwargs: Any) -> Column[Any]:
    # Stored as VARCHAR (no native PG enum type): adding a member then needs no migration.
    return Column(
        name,
        SAEnum(
            enum_cls,
            native_enum=False,
            create_constraint=False,
            length=16,
            values_callable=lambda e: [m.value for m in e],
        ),
        nullable=False,
        **kwargs,
    )


class CreditKind(StrEnum):
    grant = "grant"  # the daily allowance
    reserve = "reserve"
    capture = "capture"
    release = "release"
    purchase = "purchase"
    expire = "expire"
    admin = "admin"  # grants by an operator, and pack transfers when accounts merge
    refund = "refund"  # what was left of a refunded pack, taken back (storage.purchases)


class BucketKind(StrEnum):
    daily = "daily"
    pack = "pack"


class ReservationStatus(StrEnum):
    held = "held"
    captured = "captured"
    released = "released"


class Account(SQLModel, table=True):
    __tablename__ = "accounts"

    id: int | None = Field(default=None, primary_key=True)
    tier: str = Field(max_length=32)
    created_at: datetime = Field(sa_type=UTCDateTime)
    # Set when a link merged this account into another; it then owns nothing.
    merged_into_id: int | None = Field(default=None, foreign_key="accounts.id")
    # Set by an operator (`atelier account block`): no new job is admitted, nothing can be
    # bought; what it has stays (jobs already accepted finish, packs keep their expiry).
    blocked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    blocked_reason: str | None = Field(default=None, max_length=300)


class Identity(SQLModel, table=True):
    __tablename__ = "identities"
    __table_args__ = (
        UniqueConstraint("platform", "platform_user_id", name="uq_identities_platform_user"),
    )

    id: int | None = Field(default=None, primary_key=True)
    platform: str = Field(max_length=16)
    platform_user_id: str = Field(max_length=64)
    account_id: int = Field(foreign_key="accounts.id", index=True)
    display_name: str | None = Field(default=None, max_length=128)
    created_at: datetime = Field(sa_type=UTCDateTime)


class LinkCode(SQLModel, table=True):
    __tablename__ = "link_codes"

    code: str = Field(primary_key=True, max_length=16)
    account_id: int = Field(foreign_key="accounts.id")
    identity_id: int = Field(foreign_key="identities.id")
    created_at: datetime = Field(sa_type=UTCDateTime)
    expires_at: datetime = Field(sa_type=UTCDateTime)
    used_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    used_by_identity_id: int | None = Field(default=None, foreign_key="identities.id")


class CreditBucket(SQLModel, table=True):
    """Spendable credits of one grant; ``remaining`` is what a reserve decrements in place."""

    __tablename__ = "credit_buckets"
    __table_args__ = (CheckConstraint("remaining >= 0", name="remaining_nonneg"),)

    id: int | None = Field(default=None, primary_key=True)
    account_id: int = Field(foreign_key="accounts.id", index=True)
    kind: BucketKind = Field(sa_column=_enum(BucketKind, "kind"))
    key: str = Field(max_length=200, unique=True)
    granted: int
    remaining: int
    expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    # Set once the expire row for this bucket is written; nothing can be spent from it after.
    expired_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    created_at: datetime = Field(sa_type=UTCDateTime)


class CreditLedger(SQLModel, table=True):
    """Append-only history; per account, ``sum(amount)`` equals the live buckets' remaining."""

    __tablename__ = "credit_ledger"

    id: int | None = Field(default=None, primary_key=True)
    account_id: int = Field(foreign_key="accounts.id", index=True)
    kind: CreditKind = Field(sa_column=_enum(CreditKind, "kind"))
    bucket: str = Field(max_length=200)
    amount: int
    job_id: str | None = Field(default=None, max_length=64, index=True)
    idempotency_key: str = Field(max_length=300, unique=True)
    expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    created_at: datetime = Field(sa_type=UTCDateTime)
    note: str = Field(default="", max_length=300)


class Reservation(SQLModel, table=True):
    """A job's hold on credits; its per-bucket split is in the job's ``reserve`` ledger rows."""

    __tablename__ = "reservations"

    job_id: str = Field(primary_key=True, max_length=64)
    account_id: int = Field(foreign_key="accounts.id", index=True)
    amount: int
    status: ReservationStatus = Field(sa_column=_enum(ReservationStatus, "status"))
    created_at: datetime = Field(sa_type=UTCDateTime)
    updated_at: datetime = Field(sa_type=UTCDateTime)


class Job(SQLModel, table=True):
    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_account_status", "account_id", "status"),
        # The reconciler's scan of unfinished jobs, oldest first.
        Index("ix_jobs_status_created", "status", "created_at"),
        # Finished jobs whose front end has not confirmed the delivery (delivered_at NULL).
        Index("ix_jobs_delivered_finished", "delivered_at", "finished_at"),
    )

    id: str = Field(primary_key=True, max_length=64)
    idempotency_key: str = Field(max_length=200, unique=True)
    account_id: int = Field(foreign_key="accounts.id")
    identity_id: int | None = Field(default=None, foreign_key="identities.id")
    request_json: str = Field(sa_type=Text)
    status: JobStatus = Field(sa_column=_enum(JobStatus, "status"))
    attempts: int = 0
    error: str | None = Field(default=None, sa_type=Text)
    delivery_json: str = Field(sa_type=Text)
    cost: int
    created_at: datetime = Field(sa_type=UTCDateTime)
    started_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    updated_at: datetime = Field(sa_type=UTCDateTime)
    # Set once the front end has sent the result (Client.mark_delivered); until then the
    # dispatcher re-announces the finished job, so a broker restart loses no delivery.
    delivered_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    # The dispatcher (its consumer name) that last started the job: after a restart under the
    # same name it takes its running jobs back at once, without waiting for their leases.
    owner: str | None = Field(default=None, max_length=128)
    # The (prompt, negative) pairs admission prepared, one per style, as JSON: the worker uses
    # them instead of preparing the prompt again. NULL for rows from before 0008.
    prompts_json: str | None = Field(default=None, sa_type=Text)


class Image(SQLModel, table=True):
    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("job_id", "index", name="uq_images_job_index"),)

    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(foreign_key="jobs.id", max_length=64)
    account_id: int = Field(foreign_key="accounts.id")
    index: int
    seed: int = Field(sa_type=BigInteger)  # seeds go up to 2**32 - 1
    width: int
    height: int
    blob_key: str = Field(sa_type=String(120))
    sha256: str = Field(max_length=64)
    prompt: str = Field(sa_type=Text)
    negative: str = Field(default="", sa_type=Text)
    styles: str = Field(default="", max_length=200)  # comma separated, lower case
    model: str = Field(default="", max_length=100)
    # The platform the job was asked from ("" when no identity asked): the gallery's platform
    # filter walks an index on it instead of joining a person's every job.
    platform: str = Field(default="", max_length=16)
    infotext: str = Field(default="", sa_type=Text)
    created_at: datetime = Field(sa_type=UTCDateTime)
    deleted_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


# The gallery's keyset: newest first within one account.
Index(
    "ix_images_gallery",
    col(Image.account_id),
    col(Image.created_at).desc(),
    col(Image.id).desc(),
)
Index("ix_jobs_account_created", col(Job.account_id), col(Job.created_at).desc())
# The model and platform filters: the same keyset within one account and one value.
Index(
    "ix_images_model",
    col(Image.account_id),
    col(Image.model),
    col(Image.created_at).desc(),
    col(Image.id).desc(),
)
Index(
    "ix_images_platform",
    col(Image.account_id),
    col(Image.platform),
    col(Image.created_at).desc(),
    col(Image.id).desc(),
)
# Retention (storage.retention): the few soft-deleted images, settled reservations and spent
# buckets past their retention, found without scanning their tables.
_DELETED = col(Image.deleted_at).is_not(None)
Index("ix_images_deleted", col(Image.deleted_at), postgresql_where=_DELETED, sqlite_where=_DELETED)
Index("ix_reservations_status_updated", col(Reservation.status), col(Reservation.updated_at))
_EXPIRED = col(CreditBucket.expired_at).is_not(None)
Index(
    "ix_credit_buckets_expired",
    col(CreditBucket.expired_at),
    postgresql_where=_EXPIRED,
    sqlite_where=_EXPIRED,
)
Index("ix_credit_ledger_created", col(CreditLedger.created_at))
# Since 0009. An account's live buckets (two or three), not every bucket it ever had: what a
# balance, a reserve and the daily grant read and lock.
_LIVE = col(CreditBucket.expired_at).is_(None)
Index(
    "ix_credit_buckets_live",
    col(CreditBucket.account_id),
    col(CreditBucket.id),
    postgresql_where=_LIVE,
    sqlite_where=_LIVE,
)
# The queue (queued and running jobs) oldest first, whatever the size of the jobs table: the
# reconciler's and a restarted front end's walks stop at their limit. Queries must spell the
# statuses as literals (storage.jobs.IN_FLIGHT_SQL): neither database matches a partial index
# against bound parameters.
_QUEUE = text("status IN ('queued', 'running')")
Index("ix_jobs_in_flight", col(Job.created_at), col(Job.id), postgresql_where=_QUEUE,
      sqlite_where=_QUEUE)


class ImageStyle(SQLModel, table=True):
    """One style of one image (``Image.styles`` keeps them for display): the gallery's style
    filter walks ``ix_image_styles_gallery`` newest first instead of scanning the gallery."""

    __tablename__ = "image_styles"

    image_id: int = Field(foreign_key="images.id", primary_key=True)
    style: str = Field(max_length=100, primary_key=True)
    account_id: int = Field(foreign_key="accounts.id")
    created_at: datetime = Field(sa_type=UTCDateTime)  # the image's, for the keyset


Index(
    "ix_image_styles_gallery",
    col(ImageStyle.account_id),
    col(ImageStyle.style),
    col(ImageStyle.created_at).desc(),
    col(ImageStyle.image_id).desc(),
)


class ApiKey(SQLModel, table=True):
    """A key for the REST and A1111 APIs, acting as one identity. Only its sha256 is kept:
    the key itself is shown once, when it is made."""

    __tablename__ = "api_keys"

    id: int | None = Field(default=None, primary_key=True)
    # The key's public part ("atk_" + 8 hex): finds the row; shown in listings.
    prefix: str = Field(max_length=16, unique=True)
    key_hash: str = Field(max_length=64)
    # The identity the key acts as; its account is looked up through it on each use, so a
    # key keeps working (on the joined account) after the identity is linked elsewhere.
    identity_id: int = Field(foreign_key="identities.id", index=True)
    name: str = Field(default="", max_length=64)
    # The model A1111 clients chose with POST /sdapi/v1/options (sd_model_checkpoint).
    model: str | None = Field(default=None, max_length=100)
    created_at: datetime = Field(sa_type=UTCDateTime)
    last_used_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)


class PurchaseKind(StrEnum):
    pack = "pack"
    subscription = "subscription"


class PurchaseStatus(StrEnum):
    paid = "paid"
    refunded = "refunded"  # a refunded charge or a deleted entitlement
    ended = "ended"  # a subscription past its period


class Purchase(SQLModel, table=True):
    """A payment seen from a platform, once: ``key`` is its charge or entitlement id. Kept
    whole (never rolled up by a prune), so a refund always finds its pack."""

    __tablename__ = "purchases"

    id: int | None = Field(default=None, primary_key=True)
    key: str = Field(max_length=200, unique=True)  # "telegram:{charge id}", "discord:{ent. id}"
    account_id: int = Field(foreign_key="accounts.id", index=True)  # who bought it first
    platform: str = Field(max_length=16)
    platform_user_id: str = Field(max_length=64)
    kind: PurchaseKind = Field(sa_column=_enum(PurchaseKind, "kind"))
    product: str = Field(max_length=32)
    credits: int = 0
    bucket: str = Field(default="", max_length=200)  # the pack's credit bucket
    tier: str | None = Field(default=None, max_length=32)  # a subscription's tier
    status: PurchaseStatus = Field(sa_column=_enum(PurchaseStatus, "status"))
    expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    created_at: datetime = Field(sa_type=UTCDateTime)
    updated_at: datetime = Field(sa_type=UTCDateTime)
    refunded_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    clawed_back: int = 0  # credits taken back at the refund
    owed: int = 0  # credits already spent when it was refunded
