"""Vary (Region)'s routes over real stores: the signed link from a chat's button opens the
session on the editor (its owner's image only), the mask upload's limits and bomb-safe
decoding, and the inpaint job it submits (charged once, delivered to the image's chat)."""

from __future__ import annotations

import io
import struct
import zlib
from datetime import timedelta

from PIL import Image as PILImage

from core.jobs import DeliveryTarget
from core.request import Edit, JobKind
from core.signing import VARY_REGION_PURPOSE, sign, vary_region_url
from storage import ledger
from tests.web.conftest import Web
from tests.web.helpers import add_job, make_person
from web.session import COOKIE, csrf_token

CHAT = DeliveryTarget(frontend="telegram", chat_id="4242", message_id="17",
                      extra={"owner": "4242", "original": "", "nsfw": "0"})


def _mask(size: tuple[int, int] = (64, 64), box: tuple[int, int, int, int] = (8, 8, 40, 40),
          mode: str = "L") -> bytes:
    im = PILImage.new(mode, size, 0)
    if box[2] > box[0]:
        im.paste(255 if mode == "L" else (255, 255, 255, 255), box)
    out = io.BytesIO()
    im.save(out, "PNG")
    return out.getvalue()


def _link_path(web: Web, account_id: int, image_id: int) -> str:
    url = vary_region_url(web.settings, account_id, image_id, now=web.clock())
    return url.removeprefix(web.settings.public_base_url.rstrip("/"))


def _csrf(web: Web) -> str:
    class _Req:  # the token only depends on the cookie
        cookies = dict(web.http.cookies)

    return csrf_token(web.ctx, _Req())  # type: ignore[arg-type]


def _balance(web: Web, account_id: int) -> int:
    with web.sessions() as s:
        return ledger.balance(session=s, account_id=account_id, now=web.clock(),
                              tiers=web.settings.tiers).total


async def test_the_link_opens_the_owners_editor_and_nothing_else(web: Web) -> None:
    me, other = make_person(web.sessions), make_person(web.sessions)
    mine = add_job(web.sessions, web.blobs, me, "a lighthouse", delivery=CHAT)[0]
    theirs = add_job(web.sessions, web.blobs, other, "a secret garden")[0]

    opened = await web.http.get(_link_path(web, me.account_id, mine.id))
    assert opened.status_code == 303
    assert opened.headers["location"] == f"/gallery/image/{mine.id}/vary"
    assert opened.headers["referrer-policy"] == "no-referrer"
    assert COOKIE in web.http.cookies
    editor = await web.http.get(f"/gallery/image/{mine.id}/vary")
    assert editor.status_code == 200
    assert 'id="mask" width="64" height="64"' in editor.text
    assert "a lighthouse" in editor.text and "Telegram chat" in editor.text
    assert "/static/vary.js" in editor.text
    assert "script-src 'self'" in editor.headers["content-security-policy"]
    # The image's page links to the editor.
    image_page = await web.http.get(f"/gallery/image/{mine.id}")
    assert f"/gallery/image/{mine.id}/vary" in image_page.text
    # Signed in as me, another account's image has no editor.
    assert (await web.http.get(f"/gallery/image/{theirs.id}/vary")).status_code == 404

    # A link naming someone else's image (as a forged subject would) opens nothing.
    web.http.cookies.clear()
    crossed = await web.http.get(_link_path(web, me.account_id, theirs.id))
    assert crossed.status_code == 404 and COOKIE not in web.http.cookies
    # Altered, expired, or a gallery token passed off as a vary link: refused.
    path = _link_path(web, me.account_id, mine.id)
    assert (await web.http.get(path[:-2] + "xx")).status_code == 403
    gallery_token = sign(web.key, subject=f"{me.account_id}:{mine.id}", purpose="gallery",
                         now=web.clock(), ttl=timedelta(days=1))
    assert (await web.http.get(f"/v/{gallery_token}")).status_code == 403
    old = sign(web.key, subject=f"{me.account_id}:{mine.id}", purpose=VARY_REGION_PURPOSE,
               now=web.clock() - timedelta(days=30), ttl=timedelta(days=7))
    assert (await web.http.get(f"/v/{old}")).status_code == 403
    assert COOKIE not in web.http.cookies
    # Without a session the editor says to sign in.
    assert (await web.http.get(f"/gallery/image/{mine.id}/vary")).status_code == 401


async def test_submit_makes_one_inpaint_job_for_the_images_chat(web: Web) -> None:
    me = make_person(web.sessions)
    image = add_job(web.sessions, web.blobs, me, "a harbour at dusk", styles=["anime"],
                    delivery=CHAT)[0]
    await web.http.get(_link_path(web, me.account_id, image.id))
    before = _balance(web, me.account_id)
    url = f"/gallery/image/{image.id}/vary"
    form = {"csrf": _csrf(web), "nonce": "v1", "prompt": "a red sailboat"}
    files = {"mask": ("mask.png", _mask(), "image/png")}
    first = await web.http.post(url, data=form, files=files)
    second = await web.http.post(url, data=form, files=files)  # a double click: the same job
    assert first.status_code == second.status_code == 200, first.text
    assert first.json() == second.json()
    job = await web.client.job(first.json()["job"].rsplit("/", 1)[1])
    req = job.request
    assert req.kind is JobKind.inpaint and req.edit is Edit.vary_region
    assert req.prompt == "a red sailboat" and req.styles == ("anime",)
    assert (req.width, req.height) == (64, 64) and req.count == 1
    assert req.init_image == web.blobs.get(image.blob_key)
    painted = PILImage.open(io.BytesIO(req.mask or b""))
    assert painted.mode == "L" and painted.getbbox() == (8, 8, 40, 40)
    # Back to the chat the image came from (no status message there), the owner on it.
    assert job.delivery.frontend == "telegram" and job.delivery.chat_id == "4242"
    assert job.delivery.message_id is None and job.delivery.extra["owner"] == "4242"
    assert _balance(web, me.account_id) == before - job.cost and job.cost >= 1
    # The job's page follows it.
    assert (await web.http.get(first.json()["job"])).status_code == 200

    # An image made on the web is delivered to the gallery.
    web_image = add_job(web.sessions, web.blobs, me, "a kite")[0]
    made = await web.http.post(f"/gallery/image/{web_image.id}/vary",
                               data={**form, "nonce": "v2"}, files=files)
    web_job = await web.client.job(made.json()["job"].rsplit("/", 1)[1])
    assert web_job.delivery.frontend == "web" and web_job.request.prompt == "a red sailboat"


async def test_masks_are_checked_before_anything_is_charged(web: Web) -> None:
    me = make_person(web.sessions)
    image = add_job(web.sessions, web.blobs, me, "a meadow", delivery=CHAT)[0]
    await web.http.get(_link_path(web, me.account_id, image.id))
    before = _balance(web, me.account_id)
    url = f"/gallery/image/{image.id}/vary"
    form = {"csrf": _csrf(web), "nonce": "m", "prompt": "a fox"}

    async def post(mask: bytes, **changes: str) -> tuple[int, str]:
        reply = await web.http.post(url, data={**form, **changes},
                                    files={"mask": ("mask.png", mask, "image/png")})
        return reply.status_code, reply.json().get("detail", "")

    assert await post(_mask(), csrf="") == (403, "this form has expired; reload the page "
                                            "and try again")
    status, detail = await post(_mask((32, 32)))
    assert status == 422 and "64x64" in detail and "32x32" in detail
    status, detail = await post(_mask(box=(0, 0, 0, 0)))
    assert status == 422 and "empty" in detail
    status, detail = await post(b"not an image at all")
    assert status == 422 and "PNG, JPEG or WebP" in detail
    # A decompression bomb: a tiny file declaring 100,000 x 100,000 pixels.
    status, detail = await post(_bomb(100_000, 100_000))
    assert status == 422 and "pixels" in detail
    # Over the upload limit: refused on its size, before decoding (and a body over the
    # app's body limit never reaches the route).
    limits = web.settings.limits.model_copy(update={"max_upload_bytes": 4096})
    web.ctx.settings = web.settings.model_copy(update={"limits": limits})
    status, detail = await post(b"\x89PNG" + b"\0" * 4096)
    assert status == 422 and "too large" in detail
    status, _ = await post(b"\0" * (web.settings.web_max_body_bytes + 1))
    assert status == 413
    web.ctx.settings = web.settings
    # A transparent canvas painted white (what a browser's canvas gives) is a mask too.
    ok = await web.http.post(url, data={**form, "nonce": "rgba"},
                             files={"mask": ("m.png", _mask(mode="RGBA"), "image/png")})
    assert ok.status_code == 200
    job = await web.client.job(ok.json()["job"].rsplit("/", 1)[1])
    assert _balance(web, me.account_id) == before - job.cost


def _bomb(width: int, height: int) -> bytes:
    """A valid PNG header and a little zlib data declaring a huge greyscale image."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = zlib.compress(b"\0" * 1024)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body)
            + chunk(b"IEND", b""))
