"""The gallery: image rows per job, listed newest first with keyset cursors, filters and prompt
search (SQLite FTS5 / PostgreSQL full text), soft-deleted by their owner."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, Field, field_validator
from sqlalchemy import update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import aliased
from sqlmodel import Session, col, select

from core.errors import Forbidden, InvalidRequest, NotFound
from storage import words as words_index
from storage.models import SQLITE_WORDS_TABLE, Identity, Image, ImageStyle, Job, UTCDateTime, utcnow

MAX_PAGE = 100
# Image ids are SQL INTEGER (32 bits on PostgreSQL): a larger one names no image, and sending
# it would be the database's error (a 500 at the web edge), not "does not exist".
MAX_ID = 2**31 - 1


class NewImage(BaseModel):
    """One finished image as the dispatcher stores it (the PNG itself is in the blob store)."""

    index: int = Field(ge=0)
    seed: int = Field(ge=0)
    width: int = Field(ge=1)
    height: int = Field(ge=1)
    blob_key: str = Field(max_length=120)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    prompt: str
    negative: str = ""
    styles: tuple[str, ...] = ()
    model: str = Field(default="", max_length=100)
    infotext: str = ""

    @field_validator("styles")
    @classmethod
    def _styles(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        out = tuple(s.strip().lower() for s in v if s.strip())
        for s in out:
            if "," in s:
                raise ValueError(f"a style name cannot contain a comma, got {s!r}")
        return out


class ImageRead(BaseModel):
    id: int
    job_id: str
    account_id: int
    index: int
    seed: int
    width: int
    height: int
    blob_key: str
    sha256: str
    prompt: str
    negative: str
    styles: list[str]
    model: str
    infotext: str
    created_at: datetime


class ImagePage(BaseModel):
    items: list[ImageRead]
    next_cursor: str | None  # pass as ``before`` for the next (older) page


def add_images(
    *,
    session: Session,
    job_id: str,
    images: Sequence[NewImage],
    now: datetime | None = None,
) -> list[ImageRead]:
    """Store a job's images, idempotent by (job, index); returns all the job's images."""
    job = session.exec(select(Job).where(Job.id == job_id)).first()
    if job is None:
        raise NotFound(f"job {job_id} does not exist")
    now = now or utcnow()
    platform = ""
    if job.identity_id is not None:
        identity = session.get(Identity, job.identity_id)
        platform = identity.platform if identity is not None else ""
    rows = [
        {
            "job_id": job_id,
            "account_id": job.account_id,
            "index": img.index,
            "seed": img.seed,
            "width": img.width,
            "height": img.height,
            "blob_key": img.blob_key,
            "sha256": img.sha256,
            "prompt": img.prompt,
            "negative": img.negative,
            "styles": ",".join(img.styles),
            "model": img.model,
            "platform": platform,
            "infotext": img.infotext,
            "created_at": now,
        }
        for img in images
    ]
    if rows:
        insert: Any = (
            postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
        )
        added = session.exec(
            insert(Image)
            .values(rows)
            .on_conflict_do_nothing(index_elements=["job_id", "index"])
            .returning(col(Image.id), col(Image.index))
        ).all()
        styles = {img.index: dict.fromkeys(img.styles) for img in images}
        style_rows = [
            {"image_id": image_id, "style": style, "account_id": job.account_id, "created_at": now}
            for image_id, index in added
            for style in styles[index]
        ]
        if style_rows:
            session.exec(insert(ImageStyle).values(style_rows))
    return list_job_images(session=session, job_id=job_id)


def list_job_images(*, session: Session, job_id: str) -> list[ImageRead]:
    rows = session.exec(
        select(Image)
        .where(Image.job_id == job_id, col(Image.deleted_at).is_(None))
        .order_by(col(Image.index))
    ).all()
    return [_read(i) for i in rows]


def list_images(
    *,
    session: Session,
    account_id: int,
    before: str | None = None,
    limit: int = 24,
    style: str | None = None,
    model: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    search: str | None = None,
    platform: str | None = None,
) -> ImagePage:
    """One page of an account's gallery, newest first. ``before`` is the previous page's
    ``next_cursor``; ``search`` matches all of its words in the prompt, in any order."""
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidRequest(f"limit must be between 1 and {MAX_PAGE}, got {limit}")
    stmt = select(Image).where(Image.account_id == account_id, col(Image.deleted_at).is_(None))
    # The keyset: the image's (created_at, id), or the same values from its style row, so
    # that a style filter walks ix_image_styles_gallery newest first and stops at a page.
    created, ident = col(Image.created_at), col(Image.id)
    if style:
        stmt = stmt.join(ImageStyle, col(ImageStyle.image_id) == col(Image.id)).where(
            ImageStyle.account_id == account_id, ImageStyle.style == style.strip().lower()
        )
        created, ident = col(ImageStyle.created_at), col(ImageStyle.image_id)
    if before is not None:
        ts, image_id = decode_cursor(before)
        after = sa.tuple_(sa.literal(ts, UTCDateTime()), sa.literal(image_id, sa.Integer()))
        stmt = stmt.where(sa.tuple_(created, ident) < after)
    if model:
        stmt = stmt.where(Image.model == model)
    if platform:
        # The platform the job was asked from (a linked account spans several).
        stmt = stmt.where(Image.platform == platform)
    if since is not None:
        stmt = stmt.where(created >= since)
    if until is not None:
        stmt = stmt.where(created < until)
    rows: list[Image] | None = None
    if search is not None and search.strip():
        if not words_index.words(search):
            return ImagePage(items=[], next_cursor=None)  # only punctuation: nothing can match
        words = search.split()  # each database reads the words its own way, below
        matches = _prompt_matches(session, account_id, words)
        if session.get_bind().dialect.name == "postgresql":
            rows = _recent_matches(session, stmt, created, ident, words, limit + 1)
            if rows is None:
                stmt, created, ident = _fenced(stmt.where(matches))
        else:
            # The person's matches (an FTS5 lookup of their keyed words), then the gallery's
            # index walked newest first until a page of them.
            stmt = stmt.where(matches)
    if rows is None:
        stmt = stmt.order_by(created.desc(), ident.desc()).limit(limit + 1)
        rows = list(session.exec(stmt).all())
    items = [_read(i) for i in rows[:limit]]
    next_cursor = None
    if len(rows) > limit:
        last = items[-1]
        next_cursor = encode_cursor(last.created_at, last.id)
    return ImagePage(items=items, next_cursor=next_cursor)


def get_image(*, session: Session, image_id: int, account_id: int) -> ImageRead:
    """An image of ``account_id``'s gallery; Forbidden for another account's image."""
    return _read(_owned(session, image_id, account_id))


def soft_delete(
    *, session: Session, image_id: int, account_id: int, now: datetime | None = None
) -> None:
    """Hide an image from its owner's gallery (the blob stays; it may be shared by content)."""
    _owned(session, image_id, account_id)
    session.exec(
        update(Image)
        .where(col(Image.id) == image_id, col(Image.deleted_at).is_(None))
        .values(deleted_at=now or utcnow())
        .execution_options(synchronize_session=False)
    )


def delete_image(
    *, session: Session, image_id: int, account_id: int, now: datetime | None = None
) -> list[str]:
    """Soft-delete an owner's image; returns the blob keys no live image uses any more (the
    caller removes those blobs once this transaction commits)."""
    image = _owned(session, image_id, account_id)
    soft_delete(session=session, image_id=image_id, account_id=account_id, now=now)
    still_used = session.exec(
        select(Image.id).where(Image.blob_key == image.blob_key, col(Image.deleted_at).is_(None))
    ).first()
    return [] if still_used is not None else [image.blob_key]


def encode_cursor(created_at: datetime, image_id: int) -> str:
    raw = f"{created_at.isoformat()}|{image_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        ts, image_id = raw.split("|")
        when = datetime.fromisoformat(ts)
        if when.tzinfo is None:
            raise ValueError("naive")
        if not 1 <= int(image_id) <= MAX_ID:
            raise ValueError("id out of range")
        return when, int(image_id)
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise InvalidRequest(f"invalid gallery cursor {cursor[:40]!r}") from None


def _prompt_matches(
    session: Session, account_id: int, words: list[str]
) -> sa.ColumnElement[bool]:
    if session.get_bind().dialect.name == "postgresql":
        # ix_images_words: the person's own entries of each word ('42:fox'), all of them.
        mine = sa.func.atelier_account_words(col(Image.account_id), col(Image.prompt))
        asked = sa.func.atelier_account_words(
            sa.literal(account_id, sa.Integer()), sa.literal(" ".join(words), sa.Text())
        )
        # (Text with no word PostgreSQL reads would contain nothing, so match everything.)
        return sa.and_(mine.op("@>")(asked), sa.func.cardinality(asked) > 0)
    # images_words: the person's own entries of each word ('42xfox'), not everyone's.
    query = words_index.match_query(account_id, words)
    fts = sa.table(SQLITE_WORDS_TABLE, sa.column("rowid"))
    hits = sa.select(fts.c.rowid).where(
        sa.text(f"{SQLITE_WORDS_TABLE} MATCH :fts_query").bindparams(fts_query=query)
    )
    return col(Image.id).in_(hits)


def _ts_match(prompt: Any, words: list[str]) -> sa.ColumnElement[bool]:
    # Literal 'simple' (not a bind parameter) so the planner matches the index expression.
    simple: sa.ColumnElement[str] = sa.literal_column("'simple'")
    vector = sa.func.to_tsvector(simple, prompt)
    return vector.bool_op("@@")(sa.func.plainto_tsquery(simple, " ".join(words)))


# How many of the newest images (of the page's filters) a search reads first.
SEARCH_PROBE = 400


def _recent_matches(
    session: Session, stmt: Any, created: Any, ident: Any, words: list[str], want: int
) -> list[Image] | None:
    """A search for common words, answered from the newest SEARCH_PROBE images: walk the
    gallery's keyset index newest first, matching each prompt, and stop at ``want`` matches.
    A word in a tenth of a person's prompts fills a page within a few hundred images, where
    the index of the words would hand over all of its thousands of matches to be sorted
    (55 ms for one word in 16% of 100,000 prompts). PostgreSQL only. None when the probe
    did not fill the page: rarer words, which the words' index finds cheaply."""
    recent = stmt.order_by(created.desc(), ident.desc()).limit(SEARCH_PROBE).subquery("recent")
    found = aliased(Image, recent)
    query = select(found).where(_ts_match(recent.c.prompt, words))
    rows = list(session.exec(
        query.order_by(recent.c.created_at.desc(), recent.c.id.desc()).limit(want)
    ).all())
    return rows if len(rows) == want else None


def _fenced(stmt: Any) -> tuple[Any, Any, Any]:
    """A PostgreSQL search as ``SELECT * FROM (matches OFFSET 0) ORDER BY ... LIMIT``: the
    fence makes the planner find the matches first, through ``ix_images_words`` (the
    account's entries of the words), then sort them for the page. Without it, it walks the
    gallery newest first computing to_tsvector on every row until it has a page: 25 ms for two
    words in 1.7% of prompts, seconds over a large gallery where a word is rare (its
    statistics are of all accounts, so one person's rare word can look common)."""
    found = stmt.offset(0).subquery("found")
    return select(aliased(Image, found)), found.c.created_at, found.c.id


def _owned(session: Session, image_id: int, account_id: int) -> Image:
    if not 1 <= image_id <= MAX_ID:
        raise NotFound(f"image {image_id} does not exist")
    image = session.exec(
        select(Image).where(Image.id == image_id).execution_options(populate_existing=True)
    ).first()
    if image is None or image.deleted_at is not None:
        raise NotFound(f"image {image_id} does not exist")
    if image.account_id != account_id:
        raise Forbidden(f"image {image_id} belongs to someone else's gallery")
    return image


def _read(image: Image) -> ImageRead:
    return ImageRead(
        id=image.id or 0,
        job_id=image.job_id,
        account_id=image.account_id,
        index=image.index,
        seed=image.seed,
        width=image.width,
        height=image.height,
        blob_key=image.blob_key,
        sha256=image.sha256,
        prompt=image.prompt,
        negative=image.negative,
        styles=[s for s in image.styles.split(",") if s],
        model=image.model,
        infotext=image.infotext,
        created_at=image.created_at,
    )
