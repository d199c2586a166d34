"""The gallery's routes over real stores: grid pages, search and filters, thumbnails, the PNG
download with its infotext, streamed ZIPs, delete (CSRF, blobs), make again (charged once)."""

from __future__ import annotations

import io
import os
import re
import zipfile
from datetime import timedelta
from pathlib import Path

from PIL import Image as PILImage

from core.infotext import parse_infotext, read_png_infotext
from storage import ledger
from storage.models import Job
from tests.web.conftest import Web
from tests.web.helpers import NOW, add_job, gallery_link, link_identity, make_person
from web.gallery.files import SKIPPED_NAME, download_name, stream_zip, thumb_key, thumb_store
from web.gallery.pages import PAGE_SIZE

IDS = re.compile(r'<figure class="card" data-id="(\d+)"')


async def _signed_in(web: Web, account_id: int) -> str:
    """Sign in; returns a CSRF token from an image-less page of the session."""
    link = gallery_link(web.key, account_id, now=web.clock(), ttl=timedelta(days=1))
    assert (await web.http.get(link)).status_code == 303
    page = await web.http.get("/gallery")
    assert page.status_code == 200
    from web.session import csrf_token

    class _Req:  # the token only depends on the cookie
        cookies = dict(web.http.cookies)

    return csrf_token(web.ctx, _Req())  # type: ignore[arg-type]


async def _ids(web: Web, url: str) -> tuple[list[int], str | None]:
    reply = await web.http.get(url)
    assert reply.status_code == 200, reply.text
    more = re.search(r'id="more" href="([^"]+)"', reply.text)
    return [int(i) for i in IDS.findall(reply.text)], (
        more.group(1).replace("&amp;", "&") if more else None
    )


async def test_grid_pages_newest_first_without_gaps(web: Web) -> None:
    me = make_person(web.sessions)
    made = [add_job(web.sessions, web.blobs, me, f"picture {n}", when=NOW + timedelta(minutes=n))
            [0].id for n in range(PAGE_SIZE * 2 + 5)]
    await _signed_in(web, me.account_id)
    seen: list[int] = []
    url: str | None = "/gallery"
    pages = 0
    while url:
        ids, url = await _ids(web, url)
        seen += ids
        pages += 1
    assert pages == 3 and seen == list(reversed(made))
    # The infinite scroll's fragment: only cards and the next link.
    first_more = (await _ids(web, "/gallery"))[1]
    assert first_more is not None
    fragment = await web.http.get(first_more + "&partial=1")
    assert fragment.text.lstrip().startswith("<figure") and "<html" not in fragment.text


async def test_search_and_filters(web: Web) -> None:
    me = make_person(web.sessions)
    discord = link_identity(web.sessions, me, "discord")
    fox = add_job(web.sessions, web.blobs, me, "a red fox in snow", styles=["anime"])[0]
    owl = add_job(web.sessions, web.blobs, discord, "an owl at night", model="tiny-xl",
                  when=NOW + timedelta(days=3))[0]
    boat = add_job(web.sessions, web.blobs, me, "a red boat", styles=["watercolor"],
                   when=NOW + timedelta(days=5))[0]
    await _signed_in(web, me.account_id)

    async def ids(query: str) -> set[int]:
        return set((await _ids(web, "/gallery?" + query))[0])

    assert await ids("q=red") == {fox.id, boat.id}
    assert await ids("q=fox+red") == {fox.id}  # every word, any order
    assert await ids("q=snow+boat") == set()
    assert await ids("style=anime") == {fox.id}
    assert await ids("model=tiny-xl") == {owl.id}
    assert await ids("platform=discord") == {owl.id}
    assert await ids("platform=telegram") == {fox.id, boat.id}
    day = (NOW + timedelta(days=3)).date().isoformat()
    assert await ids(f"since={day}") == {owl.id, boat.id}
    assert await ids(f"since={day}&until={day}") == {owl.id}
    page = await web.http.get("/gallery")
    for option in ("anime", "watercolor", "tiny-xl", "discord", "telegram"):
        assert f"<option>{option}</option>" in page.text
    bad = await web.http.get("/gallery?since=yesterday")
    assert bad.status_code == 422 and "since must be a date" in bad.text
    bad = await web.http.get("/gallery?before=not-a-cursor")
    assert bad.status_code == 422 and "cursor" in bad.text


async def test_prompts_are_shown_as_text(web: Web) -> None:
    me = make_person(web.sessions)
    image = add_job(web.sessions, web.blobs, me, '<script>alert("x")</script> "quoted" & more')[0]
    await _signed_in(web, me.account_id)
    for url in ("/gallery", f"/gallery/image/{image.id}"):
        text = (await web.http.get(url)).text
        assert "<script>alert" not in text
        assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in text


async def test_thumbnails_are_webp_made_once(web: Web) -> None:
    me = make_person(web.sessions)
    image = add_job(web.sessions, web.blobs, me, "a lighthouse")[0]
    await _signed_in(web, me.account_id)
    first = await web.http.get(f"/gallery/thumb/{image.id}.webp")
    assert first.status_code == 200 and first.headers["content-type"] == "image/webp"
    assert first.headers["cache-control"].startswith("private")
    with PILImage.open(io.BytesIO(first.content)) as im:
        assert im.format == "WEBP" and im.size == (64, 64)
    path = thumb_store(web.blobs).path(thumb_key(image))
    made = path.stat().st_mtime_ns
    again = await web.http.get(f"/gallery/thumb/{image.id}.webp")
    assert again.content == first.content and path.stat().st_mtime_ns == made


async def test_download_carries_the_infotext(web: Web) -> None:
    me = make_person(web.sessions)
    image = add_job(web.sessions, web.blobs, me, "a blue whale", seed=777, styles=["anime"])[0]
    await _signed_in(web, me.account_id)
    reply = await web.http.get(f"/gallery/image/{image.id}.png")
    assert reply.status_code == 200 and reply.headers["content-type"] == "image/png"
    assert reply.headers["content-disposition"].startswith("attachment")
    assert f'{image.id}-a-blue-whale-777.png' in reply.headers["content-disposition"]
    text = read_png_infotext(reply.content)
    assert text is not None
    info = parse_infotext(text)
    assert (info.prompt, info.seed, info.styles) == ("a blue whale", 777, ("anime",))
    page = await web.http.get(f"/gallery/image/{image.id}")
    assert '<td id="seed">777</td>' in page.text and "Copy seed" in page.text


async def test_zip_of_a_selection_and_of_everything(web: Web) -> None:
    me = make_person(web.sessions)
    images = [add_job(web.sessions, web.blobs, me, f"tree {n}", seed=n + 1,
                      when=NOW + timedelta(seconds=n))[0] for n in range(130)]
    await _signed_in(web, me.account_id)
    pick = [images[3].id, images[7].id, images[3].id]
    reply = await web.http.get("/gallery/zip", params={"ids": pick})
    assert reply.status_code == 200 and reply.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(reply.content)) as zf:
        names = zf.namelist()
        assert len(names) == 2
        for name in names:
            assert read_png_infotext(zf.read(name)) is not None
    body = (await web.http.get("/gallery/zip?all=1")).content
    with zipfile.ZipFile(io.BytesIO(body)) as zf:
        assert len(zf.namelist()) == 130  # more than one store page (100)
        assert zf.testzip() is None
    assert (await web.http.get("/gallery/zip")).status_code == 422
    # Written as it goes: a piece per image, each piece no bigger than one image's data
    # (httpx's ASGI transport gathers the body, so the generator itself is looked at here).
    pieces = list(stream_zip(web.blobs, images))
    assert len(pieces) > len(images)
    biggest = max(len(web.blobs.get(i.blob_key)) for i in images)
    assert max(len(p) for p in pieces[:-1]) < 2 * biggest
    assert b"".join(pieces)[:2] == b"PK"  # the last piece: the directory of names


async def test_a_zip_leaves_out_what_cannot_be_read_and_says_so(
    web: Web, tmp_path: Path
) -> None:
    me = make_person(web.sessions)
    images = [add_job(web.sessions, web.blobs, me, f"bird {n}", seed=n + 1,
                      when=NOW + timedelta(seconds=n))[0] for n in range(3)]
    (web.blobs.root / images[0].blob_key).unlink()  # missing
    refused = web.blobs.root / images[2].blob_key  # leads outside the store
    outside = tmp_path / "outside.png"
    outside.write_bytes(refused.read_bytes())
    refused.unlink()
    os.symlink(outside, refused)
    await _signed_in(web, me.account_id)
    for url in ("/gallery/zip?all=1", "/gallery/zip?" + "&".join(f"ids={i.id}" for i in images)):
        reply = await web.http.get(url)
        assert reply.status_code == 200
        with zipfile.ZipFile(io.BytesIO(reply.content)) as zf:
            assert zf.testzip() is None
            assert zf.namelist() == [download_name(images[1]), SKIPPED_NAME]
            listed = zf.read(SKIPPED_NAME).decode()
        assert download_name(images[0]) in listed and download_name(images[2]) in listed
        assert str(tmp_path) not in listed  # names the pictures, never a server path


async def test_delete_needs_the_csrf_token_and_removes_the_files(web: Web) -> None:
    me = make_person(web.sessions)
    image = add_job(web.sessions, web.blobs, me, "a lonely tree")[0]
    csrf = await _signed_in(web, me.account_id)
    assert (await web.http.get(f"/gallery/thumb/{image.id}.webp")).status_code == 200
    url = f"/gallery/image/{image.id}/delete"
    assert (await web.http.post(url, data={})).status_code == 403
    assert (await web.http.post(url, data={"csrf": "0" * 40})).status_code == 403
    foreign = await web.http.post(url, data={"csrf": csrf},
                                  headers={"origin": "https://evil.example"})
    assert foreign.status_code == 403
    assert web.blobs.exists(image.blob_key)
    done = await web.http.post(url, data={"csrf": csrf})
    assert done.status_code == 303 and done.headers["location"] == "/gallery"
    assert not web.blobs.exists(image.blob_key)
    assert not thumb_store(web.blobs).exists(thumb_key(image))
    assert (await web.http.get(f"/gallery/image/{image.id}")).status_code == 404


async def test_a_blob_another_image_uses_stays(web: Web) -> None:
    me = make_person(web.sessions)
    same = add_job(web.sessions, web.blobs, me, "same bytes", color=(1, 2, 3))[0]
    body = web.blobs.get(same.blob_key)
    other = add_job(web.sessions, web.blobs, me, "same bytes again", data=body)[0]
    assert other.blob_key == same.blob_key
    csrf = await _signed_in(web, me.account_id)
    await web.http.post(f"/gallery/image/{same.id}/delete", data={"csrf": csrf})
    assert web.blobs.exists(other.blob_key)
    assert (await web.http.get(f"/gallery/image/{other.id}.png")).status_code == 200


async def test_make_again_submits_one_charged_job(web: Web) -> None:
    me = make_person(web.sessions)
    image = add_job(web.sessions, web.blobs, me, "a castle", seed=4242, styles=["anime"])[0]
    csrf = await _signed_in(web, me.account_id)

    def balance() -> int:
        with web.sessions() as s:
            return ledger.balance(session=s, account_id=me.account_id, now=web.clock(),
                                  tiers=web.settings.tiers).total

    before = balance()
    form = {"csrf": csrf, "nonce": "n1", "mode": "again", "keep_seed": "true"}
    url = f"/gallery/image/{image.id}/make"
    first = await web.http.post(url, data=form)
    second = await web.http.post(url, data=form)  # a double click: the same job
    assert first.status_code == second.status_code == 303
    assert first.headers["location"] == second.headers["location"]
    job_id = first.headers["location"].rsplit("/", 1)[1]
    job = await web.client.job(job_id)
    assert job.request.seed == 4242 and job.request.styles == ("anime",)
    assert job.request.prompt == "a castle" and job.delivery.frontend == "web"
    assert balance() == before - job.cost and job.cost >= 1
    variation = await web.http.post(url, data={**form, "mode": "variations", "nonce": "n2"})
    vjob = await web.client.job(variation.headers["location"].rsplit("/", 1)[1])
    assert vjob.request.kind.value == "variation" and vjob.request.init_image
    page = await web.http.get(f"/gallery/job/{job_id}")
    assert page.status_code == 200 and f"/gallery/job/{job_id}/events" in page.text
    assert (await web.http.post(url, data={**form, "csrf": ""})).status_code == 403
    with web.sessions() as s:
        assert s.get(Job, job_id) is not None
    other = make_person(web.sessions)
    web.http.cookies.clear()
    await _signed_in(web, other.account_id)
    assert (await web.http.get(f"/gallery/job/{job_id}")).status_code == 404
    assert (await web.http.get(f"/gallery/job/{job_id}/events")).status_code == 404


async def test_web_deliveries_are_confirmed_and_acked(web: Web) -> None:
    from core.jobs import JobStatus
    from storage import jobs as job_repo
    from storage.db import transaction
    from web.gallery.deliveries import FRONTEND, settle_once

    me = make_person(web.sessions)
    image = add_job(web.sessions, web.blobs, me, "a comet")[0]
    csrf = await _signed_in(web, me.account_id)
    made = await web.http.post(f"/gallery/image/{image.id}/make",
                               data={"csrf": csrf, "nonce": "d1", "mode": "again"})
    job_id = made.headers["location"].rsplit("/", 1)[1]
    with transaction(web.sessions) as s:  # as the dispatcher leaves it
        job_repo.set_status(session=s, job_id=job_id, status=JobStatus.running)
        job_repo.set_status(session=s, job_id=job_id, status=JobStatus.succeeded)
    await web.client.broker.deliveries.publish_delivery(FRONTEND, {"v": "1", "kind": "done",
                                                        "job_id": job_id})
    assert (await web.client.job(job_id)).delivered_at is None
    assert await settle_once(web.client) == 1
    assert (await web.client.job(job_id)).delivered_at is not None
    assert await settle_once(web.client) == 0  # acked: not read again


async def test_grid_form_submits_every_cell_charged_as_their_sum(web: Web) -> None:
    me = make_person(web.sessions)
    image = add_job(web.sessions, web.blobs, me, "a red castle", seed=77)[0]
    csrf = await _signed_in(web, me.account_id)
    page = await web.http.get(f"/gallery/image/{image.id}")
    assert 'id="make-grid"' in page.text
    form = {"csrf": csrf, "nonce": "g1", "x": "cfg=3,9", "y": "sr=red,blue"}
    url = f"/gallery/image/{image.id}/grid"
    first = await web.http.post(url, data=form)
    again = await web.http.post(url, data=form)  # a double click: the same grid
    assert first.status_code == again.status_code == 303
    assert first.headers["location"] == again.headers["location"]
    first_id = first.headers["location"].rsplit("/", 1)[1]
    with web.sessions() as s:
        from sqlmodel import select

        jobs = list(s.exec(select(Job).where(Job.account_id == me.account_id)).all())
    requests = [(await web.client.job(j.id)).request for j in jobs
                if j.idempotency_key.startswith(f"web:{me.account_id}:{image.id}:g1:grid#")]
    assert sorted((r.guidance, r.prompt) for r in requests) == [
        (3.0, "a blue castle"), (3.0, "a red castle"), (9.0, "a blue castle"),
        (9.0, "a red castle"),
    ]
    assert {r.seed for r in requests} == {77}  # the image's own seed, in every cell
    grid_page = await web.http.get(f"/gallery/grid/{first_id}")
    assert grid_page.status_code == 200
    assert "0/4 cells done" in grid_page.text and 'http-equiv="refresh"' in grid_page.text
    assert (await web.http.get(f"/gallery/grid/{first_id}/sheet.png")).status_code == 409
    bad = await web.http.post(url, data={**form, "nonce": "g2", "x": "colour=1"})
    assert bad.status_code == 422 and "unknown axis" in bad.text
    assert (await web.http.post(url, data={**form, "csrf": ""})).status_code == 403


async def test_make_again_with_a_control_picture_submits_its_controlnet_unit(web: Web) -> None:
    from cluster.adapters import AdapterSpec

    # The catalogue's ControlNet for canny (admission picks it; no worker runs it here).
    edges = AdapterSpec(name="edges", kind="controlnet", file="edges", family="sd15",
                        preprocessor="canny")
    web.client.models = web.client.models.with_adapters(edges)
    me = make_person(web.sessions)
    image = add_job(web.sessions, web.blobs, me, "a castle", seed=7)[0]
    csrf = await _signed_in(web, me.account_id)
    page = await web.http.get(f"/gallery/image/{image.id}")
    assert 'name="control"' in page.text and 'name="preprocessor"' in page.text
    buf = io.BytesIO()
    PILImage.new("RGB", (48, 32), "navy").save(buf, format="PNG")
    url = f"/gallery/image/{image.id}/make"
    form = {"csrf": csrf, "nonce": "c1", "mode": "again", "preprocessor": "canny"}
    made = await web.http.post(url, data=form,
                               files={"control": ("sketch.png", buf.getvalue(), "image/png")})
    assert made.status_code == 303, made.text
    job = await web.client.job(made.headers["location"].rsplit("/", 1)[1])
    unit = job.request.control
    assert unit is not None and (unit.controlnet, unit.preprocessor) == ("edges", "canny")
    assert PILImage.open(io.BytesIO(unit.image)).size == (48, 32)
    assert job.request.init_image is None and job.request.prompt == "a castle"
    # No file chosen (a browser's empty part): an ordinary "make again".
    plain = await web.http.post(url, data={**form, "nonce": "c2"},
                                files={"control": ("", b"", "application/octet-stream")})
    assert (await web.client.job(plain.headers["location"].rsplit("/", 1)[1])).request.control \
        is None
    bad = await web.http.post(url, data={**form, "nonce": "c3", "preprocessor": "depth"},
                              files={"control": ("sketch.png", buf.getvalue(), "image/png")})
    assert bad.status_code == 422 and "depth" in bad.text
    junk = await web.http.post(url, data={**form, "nonce": "c4"},
                               files={"control": ("x.png", b"not a picture", "image/png")})
    assert junk.status_code == 422 and "only PNG, JPEG or WebP" in junk.text
