"""Gallery: keyset pagination, filters, prompt search, soft delete and ownership."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime, timedelta

import pytest
from sqlmodel import Session

from core.errors import Forbidden, InvalidRequest, NotFound
from core.jobs import DeliveryTarget
from core.request import GenerationRequest
from storage import gallery, jobs
from storage.accounts import AccountRead

Tx = Callable[[], AbstractContextManager[Session]]


def _add(
    tx: Tx,
    account: AccountRead,
    prompts: list[str],
    at: datetime,
    *,
    styles: tuple[str, ...] = (),
    model: str = "sd15",
) -> list[gallery.ImageRead]:
    """One job whose images (one per prompt) are stored at ``at``."""
    with tx() as s:
        job, _ = jobs.create_job(
            session=s,
            idempotency_key=uuid.uuid4().hex,
            account_id=account.id,
            identity_id=None,
            request=GenerationRequest(prompt=prompts[0]),
            delivery=DeliveryTarget(frontend="web"),
            cost=1,
            now=at,
        )
        new = [
            gallery.NewImage(
                index=i,
                seed=4_000_000_000 + i,  # beyond a 32-bit signed int
                width=512,
                height=768,
                blob_key=f"ab/cd/{i}.png",
                sha256=f"{i:064x}",
                prompt=p,
                styles=styles,
                model=model,
            )
            for i, p in enumerate(prompts)
        ]
        return gallery.add_images(session=s, job_id=job.id, images=new, now=at)


def _page(tx: Tx, account_id: int, **kw: object) -> gallery.ImagePage:
    with tx() as s:
        return gallery.list_images(session=s, account_id=account_id, **kw)  # type: ignore[arg-type]


def _all_pages(tx: Tx, account_id: int, limit: int, cursor: str | None = None) -> list[int]:
    ids: list[int] = []
    while True:
        page = _page(tx, account_id, before=cursor, limit=limit)
        ids += [i.id for i in page.items]
        if page.next_cursor is None:
            return ids
        cursor = page.next_cursor


def test_pagination_is_newest_first_complete_and_stable(
    tx: Tx, new_account: Callable[..., AccountRead], now: datetime
) -> None:
    acct, other = new_account(), new_account()
    made: list[gallery.ImageRead] = []
    for n in range(8):  # 8 jobs of 1..4 images; a job's images share a timestamp
        made += _add(tx, acct, [f"p{n}-{i}" for i in range(n % 4 + 1)], now + timedelta(minutes=n))
    _add(tx, other, ["not mine"], now)
    expected = [i.id for i in sorted(made, key=lambda i: (i.created_at, i.id), reverse=True)]
    for limit in (1, 3, 7, 100):
        assert _all_pages(tx, acct.id, limit) == expected

    first = _page(tx, acct.id, limit=5)
    _add(tx, acct, ["newer", "newer too"], now + timedelta(hours=1))  # arrives between pages
    assert first.next_cursor is not None
    rest = _all_pages(tx, acct.id, 5, first.next_cursor)
    assert [i.id for i in first.items] + rest == expected
    assert first.items[0].seed >= 4_000_000_000 and first.items[0].height == 768

    with pytest.raises(InvalidRequest, match="invalid gallery cursor"):
        _page(tx, acct.id, before="not-a-cursor")
    with pytest.raises(InvalidRequest, match="limit"):
        _page(tx, acct.id, limit=0)


def test_filters(tx: Tx, new_account: Callable[..., AccountRead], now: datetime) -> None:
    acct = new_account()
    water = _add(tx, acct, ["w1", "w2"], now, styles=("watercolor", "anime"))
    photo = _add(tx, acct, ["p1"], now + timedelta(hours=1), styles=("photo",), model="sdxl")
    plain = _add(tx, acct, ["n1"], now + timedelta(hours=2), styles=("water",))

    def ids(**kw: object) -> set[int]:
        return {i.id for i in _page(tx, acct.id, **kw).items}

    assert ids(style="anime") == {i.id for i in water}
    assert ids(style="water") == {i.id for i in plain}  # whole names only
    assert ids(style="wat%") == set()
    assert ids(model="sdxl") == {i.id for i in photo}
    assert ids(since=now + timedelta(minutes=30)) == {i.id for i in photo + plain}
    assert ids(until=now + timedelta(hours=1)) == {i.id for i in water}
    assert ids(since=now + timedelta(hours=1), until=now + timedelta(hours=2)) == {photo[0].id}
    assert water[0].styles == ["watercolor", "anime"]


def test_prompt_search(tx: Tx, new_account: Callable[..., AccountRead], now: datetime) -> None:
    acct = new_account()
    hits = _add(
        tx, acct, ["A Lighthouse at dusk, oil painting", "dusk over the old lighthouse"], now
    )
    miss = _add(tx, acct, ["a lighthouse at noon", "city at dusk"], now + timedelta(minutes=1))
    _add(tx, new_account(), ["lighthouse dusk, someone else"], now)

    def found(q: str) -> set[int]:
        return {i.id for i in _page(tx, acct.id, search=q).items}

    assert found("lighthouse dusk") == {i.id for i in hits}
    assert found("DUSK   Lighthouse!") == {i.id for i in hits}
    assert found("lighthouse") == {i.id for i in hits} | {miss[0].id}
    assert found("painting") == {hits[0].id}
    assert found("submarine") == set()
    assert found("?!") == set()
    # FTS syntax in user text is just words, never an operator or an error.
    for q in ['"', "lighthouse OR", "NOT dusk", "light*", "prompt:dusk", "(dusk", "dusk -noon"]:
        _page(tx, acct.id, search=q)
    assert found("dusk NOT") == set()  # "not" is a word that no prompt has
    assert found("_") == set()  # a word no index holds: nothing, not an error
    accented = _add(tx, acct, ["Café crème at dusk"], now + timedelta(minutes=2))
    assert found("CAFÉ dusk") == {accented[0].id}
    # Each word matches whole, in this person's gallery only: a longer word or an account
    # whose id begins like this one's finds nothing.
    assert found("lighthous") == set()


def test_search_pages_newest_first_with_filters(
    tx: Tx, new_account: Callable[..., AccountRead], now: datetime
) -> None:
    """A search pages by cursor, newest first, and combines with the style and model filters
    and with deletions (PostgreSQL runs it as a sort of the matches, not a gallery walk)."""
    acct = new_account()
    fox = [
        _add(tx, acct, [f"red fox {n}", f"grey fox {n}"], now + timedelta(minutes=n),
             styles=("anime",) if n % 2 else (), model="sdxl" if n % 3 else "sd15")
        for n in range(5)
    ]
    _add(tx, acct, ["an owl"], now + timedelta(hours=1))
    newest_first = [i.id for job in reversed(fox) for i in reversed(job)]
    with tx() as s:
        gallery.soft_delete(session=s, image_id=newest_first[1], account_id=acct.id)
    live = [newest_first[0], *newest_first[2:]]
    seen: list[int] = []
    cursor = None
    while True:
        page = _page(tx, acct.id, search="fox", limit=3, before=cursor)
        seen += [i.id for i in page.items]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == live
    anime = [i.id for n in (3, 1) for i in reversed(fox[n])]
    first = _page(tx, acct.id, search="fox", style="anime", limit=3)
    assert [i.id for i in first.items] == anime[:3]
    rest = _page(tx, acct.id, search="fox", style="anime", before=first.next_cursor)
    assert [i.id for i in rest.items] == anime[3:]
    assert {i.id for i in _page(tx, acct.id, search="grey fox", model="sd15").items} == {
        fox[0][1].id, fox[3][1].id
    }


def test_soft_delete_and_ownership(
    tx: Tx, new_account: Callable[..., AccountRead], now: datetime
) -> None:
    acct, other = new_account(), new_account()
    images = _add(tx, acct, ["keep me", "delete me"], now)
    with tx() as s:
        assert gallery.get_image(session=s, image_id=images[1].id, account_id=acct.id) == images[1]
        with pytest.raises(Forbidden, match="someone else's"):
            gallery.get_image(session=s, image_id=images[1].id, account_id=other.id)
        with pytest.raises(Forbidden):
            gallery.soft_delete(session=s, image_id=images[1].id, account_id=other.id)
        gallery.soft_delete(session=s, image_id=images[1].id, account_id=acct.id)
    assert [i.id for i in _page(tx, acct.id).items] == [images[0].id]
    assert _page(tx, acct.id, search="delete").items == []
    with tx() as s:
        with pytest.raises(NotFound):
            gallery.get_image(session=s, image_id=images[1].id, account_id=acct.id)
        with pytest.raises(NotFound):
            gallery.soft_delete(session=s, image_id=images[1].id, account_id=acct.id)
        with pytest.raises(NotFound):
            gallery.get_image(session=s, image_id=10**9, account_id=acct.id)


def test_add_images_is_idempotent_by_job_and_index(
    tx: Tx, new_account: Callable[..., AccountRead], now: datetime
) -> None:
    acct = new_account()
    first = _add(tx, acct, ["one", "two"], now)
    job_id = first[0].job_id
    again = [
        gallery.NewImage(
            index=i.index,
            seed=i.seed,
            width=i.width,
            height=i.height,
            blob_key=i.blob_key,
            sha256=i.sha256,
            prompt=i.prompt,
        )
        for i in first
    ]
    with tx() as s:
        assert gallery.add_images(session=s, job_id=job_id, images=again) == first
        with pytest.raises(NotFound):
            gallery.add_images(session=s, job_id="nope", images=again)
    assert len(_page(tx, acct.id).items) == 2


@pytest.mark.parametrize("image_id", [0, -1, 2**31, 2**63, 10**30])
def test_ids_no_image_can_have_are_not_found(
    tx: Tx, new_account: Callable[..., AccountRead], image_id: int, now: datetime
) -> None:
    # Larger than the column (32 bits on PostgreSQL, 64 on SQLite): "does not exist", never
    # the database's overflow error.
    acct = new_account()
    with tx() as s:
        with pytest.raises(NotFound):
            gallery.get_image(session=s, image_id=image_id, account_id=acct.id)
        with pytest.raises(NotFound):
            gallery.delete_image(session=s, image_id=image_id, account_id=acct.id)
    with pytest.raises(InvalidRequest, match="cursor"):
        _page(tx, acct.id, before=gallery.encode_cursor(now, image_id))
