"""The control map on an image's page: an image made with a ControlNet shows what its
ControlNet followed (the edges of the person's picture, at the image's size), served once made;
an image made without one shows none, and its map is a 404."""

from __future__ import annotations

import io
from datetime import timedelta

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw

from core.control import ControlUnit, control_map, control_png
from core.images import validate_image
from core.request import GenerationRequest
from storage.db import transaction
from storage.models import Job
from tests.web.conftest import Web
from tests.web.helpers import add_job, gallery_link, make_person


def sketch() -> bytes:
    img = PILImage.new("RGB", (96, 96), "white")
    ImageDraw.Draw(img).ellipse((8, 30, 44, 66), outline="black", width=3)
    return validate_image(control_png(img), max_bytes=10**6, max_pixels=10**6).png


async def test_an_image_page_shows_its_control_map(web: Web) -> None:
    me = make_person(web.sessions)
    steered = add_job(web.sessions, web.blobs, me, "a red circle", seed=3)[0]
    plain = add_job(web.sessions, web.blobs, me, "a boat", seed=4)[0]
    unit = ControlUnit(controlnet="edges", preprocessor="canny", image=sketch())
    with transaction(web.sessions) as s:
        job = s.get(Job, steered.job_id)
        assert job is not None
        request = GenerationRequest.model_validate_json(job.request_json)
        job.request_json = request.model_copy(update={"control": unit}).model_dump_json()
    link = gallery_link(web.key, me.account_id, now=web.clock(), ttl=timedelta(days=1))
    assert (await web.http.get(link)).status_code == 303

    page = await web.http.get(f"/gallery/image/{steered.id}")
    assert page.status_code == 200
    assert f'src="/gallery/image/{steered.id}/control.png"' in page.text
    assert "Control map (canny, edges)" in page.text
    shown = await web.http.get(f"/gallery/image/{steered.id}/control.png")
    assert shown.status_code == 200 and shown.headers["content-type"] == "image/png"
    assert shown.headers["cache-control"].startswith("private")
    pixels = np.asarray(PILImage.open(io.BytesIO(shown.content)).convert("RGB"))
    assert (pixels == np.asarray(control_map(unit, 64, 64))).all() and (pixels == 255).any()
    assert (await web.http.get(f"/gallery/image/{steered.id}/control.png")).content == \
        shown.content

    other = await web.http.get(f"/gallery/image/{plain.id}")
    assert other.status_code == 200 and "control.png" not in other.text
    missing = await web.http.get(f"/gallery/image/{plain.id}/control.png")
    assert missing.status_code == 404 and "without a control picture" in missing.text
    # Someone else's image is no one's map to see.
    stranger = make_person(web.sessions)
    theirs = add_job(web.sessions, web.blobs, stranger, "a star", seed=5)[0]
    assert (await web.http.get(f"/gallery/image/{theirs.id}/control.png")).status_code == 404
