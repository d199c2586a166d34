"""Building galleries for the web tests and bench/web.py: accounts with chat identities, and
finished jobs whose images are real PNGs (with infotext) in a real blob store."""

from __future__ import annotations

import io
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from PIL import Image as PILImage
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session

from core.infotext import Infotext, format_infotext, png_with_infotext
from core.jobs import DeliveryTarget, JobStatus
from core.request import GenerationRequest
from core.signing import sign
from storage import accounts
from storage import gallery as store
from storage import jobs as job_repo
from storage.blobs import BlobStore
from storage.db import transaction
from storage.gallery import NewImage

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Person:
    account_id: int
    identity_id: int
    platform: str
    user_id: str


def make_person(
    sessions: sessionmaker[Session], platform: str = "telegram", tier: str = "free"
) -> Person:
    user = uuid.uuid4().hex[:12]
    with transaction(sessions) as s:
        acc = accounts.resolve_account(
            session=s, platform=platform, platform_user_id=user, default_tier=tier, now=NOW
        )
    assert acc.identity is not None
    return Person(acc.id, acc.identity.id, platform, user)


def link_identity(sessions: sessionmaker[Session], person: Person, platform: str) -> Person:
    """Another platform's identity on the same account (as a redeemed link code makes)."""
    from storage.models import Identity

    user = uuid.uuid4().hex[:12]
    with transaction(sessions) as s:
        ident = Identity(platform=platform, platform_user_id=user, account_id=person.account_id,
                         created_at=NOW)
        s.add(ident)
        s.flush()
        assert ident.id is not None
        return Person(person.account_id, ident.id, platform, user)


def png(color: tuple[int, int, int], size: int = 64, text: str = "") -> bytes:
    """A small picture: a sky fading from ``color`` and a sun (something to see in screenshots)."""
    from PIL import ImageDraw

    im = PILImage.new("RGB", (size, size))
    draw = ImageDraw.Draw(im)
    r, g, b = color
    for y in range(size):
        t = y / size
        draw.line([(0, y), (size, y)], fill=(int(r * (1 - t) + 20 * t), int(g * (1 - t) + 30 * t),
                                              int(b * (1 - t) + 60 * t)))
    sun = size // 4
    cx, cy = (r * size) // 256, size // 3 + (g % (size // 3))
    draw.ellipse([cx - sun // 2, cy - sun // 2, cx + sun // 2, cy + sun // 2], fill=(255, 236, 170))
    draw.rectangle([0, size * 3 // 4, size, size], fill=(b // 3, g // 3 + 40, r // 3 + 60))
    out = io.BytesIO()
    im.save(out, "PNG")
    return png_with_infotext(out.getvalue(), text) if text else out.getvalue()


def add_job(
    sessions: sessionmaker[Session],
    blobs: BlobStore,
    person: Person,
    prompt: str,
    *,
    styles: Sequence[str] = (),
    model: str = "tiny",
    count: int = 1,
    seed: int = 1234,
    when: datetime = NOW,
    color: tuple[int, int, int] | None = None,
    data: bytes | None = None,
    delivery: DeliveryTarget | None = None,
) -> list[store.ImageRead]:
    """A succeeded job with ``count`` images (distinct PNGs unless ``data`` is given)."""
    request = GenerationRequest(prompt=prompt, styles=tuple(styles), width=64, height=64,
                                steps=2, seed=seed, count=count, model=model)
    images = []
    for i in range(count):
        info = Infotext(prompt=prompt, negative="", steps=2, sampler="Euler a", cfg_scale=7.0,
                        seed=seed + i, width=64, height=64, model=model, styles=tuple(styles))
        text = format_infotext(info)
        body = data if data is not None else png(
            color or ((seed * 37 + i * 91) % 256, (seed * 11) % 256, (i * 53 + 7) % 256), 64, text
        )
        key = blobs.put(body)
        images.append(NewImage(
            index=i, seed=seed + i, width=64, height=64, blob_key=key,
            sha256=key.rsplit("/", 1)[1].split(".")[0], prompt=prompt, styles=tuple(styles),
            model=model, infotext=text,
        ))
    with transaction(sessions) as s:
        job, _ = job_repo.create_job(
            session=s, idempotency_key=f"test:{uuid.uuid4()}", account_id=person.account_id,
            identity_id=person.identity_id, request=request,
            delivery=delivery or DeliveryTarget(frontend=person.platform), cost=1, now=when,
        )
        job_repo.set_status(session=s, job_id=job.id, status=JobStatus.running, now=when)
        job_repo.set_status(session=s, job_id=job.id, status=JobStatus.succeeded, now=when)
        return store.add_images(session=s, job_id=job.id, images=images, now=when)


def gallery_link(key: bytes, account_id: int, *, now: datetime, ttl: timedelta) -> str:
    """The path a bot hands out (``/g/<token>``), signed as the bots sign it."""
    token = sign(key, subject=str(account_id), purpose="gallery", now=now, ttl=ttl)
    return f"/g/{token}"
