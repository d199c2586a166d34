"""Vary (Region) end to end: a Telegram result's button (the real PTB bot on the fake Bot API)
sends a signed link; a real headless Chromium (Debian's, driven by Playwright) opens it on the
gallery served by uvicorn, paints a mask (brush, undo, invert, eraser), edits the prompt and
submits; the tiny pipeline inpaints on a local Ray worker; the result comes back to the chat
once, charged once, with the painted region changed and every other pixel kept."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image as PILImage

from bots.common import texts
from bots.common.buttons import Action
from bots.common.keyboards import VARY_REGION
from core.infotext import parse_infotext, read_png_infotext
from core.request import Edit, JobKind
from testing.discord import payloads as p
from testing.telegram import FakeTelegram
from tests.bots.conftest import TINY, Stack, settings_for
from tests.bots.discord_conftest import DiscordStack
from tests.bots.discord_helpers import ALICE, BOB, answer_of, imagine, press
from tests.conftest import service_missing
from tests.web.helpers import Person, add_job, png
from web.app import create_app
from web.context import WebContext
from web.session import csrf_token

CHROMIUM = Path("/usr/bin/chromium")
DOCS = Path(__file__).resolve().parents[2] / "docs"
# Outside the mask the original is pasted back; the PNG round trip is exact, so any change
# there is a bug (a few levels allowed for the mask's soft edge after its resize).
OUTSIDE_TOLERANCE = 2


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


@pytest.fixture
async def live(
    tmp_path: Path, redis_url: str, fake: FakeTelegram, ray_worker: Any, tiny_dir: Path
) -> AsyncIterator[tuple[Stack, str]]:
    """The bot's whole stack and the web app on one store, with links to the web app."""
    if not CHROMIUM.exists():
        service_missing("Chromium at /usr/bin/chromium (apt-get install -y chromium)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    stack = Stack(settings_for(tmp_path, redis_url, fake, public_base_url=url), fake,
                  ray_worker, tiny_dir)
    await stack.start()
    ctx = WebContext(settings=stack.settings, sessions=stack.sessions, blobs=stack.blobs,
                     client=stack.client)
    server = _Server(uvicorn.Config(create_app(ctx), host="127.0.0.1", port=port,
                                    log_level="warning", lifespan="off"))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
    try:
        yield stack, url
    finally:
        server.should_exit = True
        await serving
        await stack.close()


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield b
        finally:
            await b.close()


def _watch_errors(page: Any) -> list[str]:
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    return errors


# Page functions (not expression strings: the gallery's CSP refuses eval).
PAINTED = """() => {
  const c = document.getElementById('mask');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 3; i < d.length; i += 4) if (d[i] > 127) n++;
  return n;
}"""


async def _drag(page: Any, box: dict[str, float], path: list[tuple[float, float]]) -> None:
    """A mouse stroke through ``path`` (fractions of the canvas)."""
    x0, y0 = path[0]
    await page.mouse.move(box["x"] + x0 * box["width"], box["y"] + y0 * box["height"])
    await page.mouse.down()
    for x, y in path[1:]:
        await page.mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"], steps=6)
    await page.mouse.up()


async def _brush(page: Any, size: int) -> None:
    """Move the brush size slider (Playwright cannot ``fill`` a range input)."""
    await page.locator("#brush-size").evaluate(
        "(e, v) => { e.value = v; e.dispatchEvent(new Event('input', {bubbles: true})); }",
        str(size))
    assert await page.input_value("#brush-size") == str(size)


@pytest.mark.timeout(300)
async def test_vary_region_from_the_chat_to_the_chat(
    live: tuple[Stack, str], browser: Any, tmp_path: Path
) -> None:
    stack, url = live
    fake, user = stack.fake, 3101
    await fake.send(user, f"/imagine a blue square on a white background {TINY} --seed 11")
    photo = await fake.wait_call("sendPhoto", chat=user)
    (first,) = await stack.finished(1)
    (original,) = stack.images(first.id)
    balance_before = await stack.balance(user)

    # The button sends the person a signed link to the editor of that image.
    labels = [b["text"] for b in photo.buttons()]
    assert VARY_REGION in labels
    data = next(b["callback_data"] for b in photo.buttons() if b["text"] == VARY_REGION)
    refused = await fake.answer(await fake.press(user + 1, photo.result, data))
    assert "belong to the person who asked" in refused.params["text"]
    await fake.answer(await fake.press(user, photo.result, data))
    sent = await fake.wait_for(
        lambda: next((c for c in fake.calls_of("sendMessage", chat=user)
                      if "/v/" in c.params["text"]), None),
        what="the Vary (Region) link",
    )
    link = sent.params["text"].split()[-1]
    assert link.startswith(f"{url}/v/")
    assert not any("/v/" in c.params.get("text", "") for c in fake.calls_of("sendMessage")
                   if c.chat_id != user)

    context = await browser.new_context(viewport={"width": 1280, "height": 800})
    page = await context.new_page()
    errors = _watch_errors(page)
    await page.goto(link)
    assert page.url == f"{url}/gallery/image/{original.id}/vary"
    await page.wait_for_selector("#vary[data-ready='1']")
    await page.wait_for_function(
        "() => { const i = document.getElementById('source'); "
        "return i.complete && i.naturalWidth > 0; }")
    canvas = page.locator("#mask")
    box = await canvas.bounding_box()
    assert box is not None and box["width"] > 300  # the 64 px image is shown large

    # Brush: a stroke across the middle; undo takes back only the second stroke.
    await _brush(page, 60)
    await _drag(page, box, [(0.25, 0.5), (0.5, 0.45), (0.75, 0.5)])
    one = await page.evaluate(PAINTED)
    assert 0 < one < 64 * 64 // 2
    await _drag(page, box, [(0.1, 0.1), (0.2, 0.15)])
    assert await page.evaluate(PAINTED) > one
    await page.click("#undo")
    assert await page.evaluate(PAINTED) == one
    # Invert paints everything else; undo brings the stroke back.
    await page.click("#invert")
    assert await page.evaluate(PAINTED) > 64 * 64 - one - 64
    await page.click("#undo")
    assert await page.evaluate(PAINTED) == one
    # The eraser takes paint away.
    await page.click("#tool-eraser")
    await _brush(page, 20)
    await _drag(page, box, [(0.72, 0.5), (0.76, 0.5)])
    painted = await page.evaluate(PAINTED)
    assert 0 < painted < one
    await page.click("#tool-brush")
    await page.fill("#vary-prompt", "a yellow star")

    await page.click("#vary-submit")
    await page.wait_for_url(f"{url}/gallery/job/*")
    await page.wait_for_selector("a.new-image", timeout=150_000)
    seen = (await page.get_attribute("#job", "data-seen") or "").split()
    assert seen[-1] == "done", seen

    # One new job: an inpaint with the edited prompt and the painted mask, charged once.
    jobs = await stack.finished(2)
    vary = jobs[-1]
    request = stack.request_of(vary)
    assert request.kind is JobKind.inpaint and request.edit is Edit.vary_region
    assert request.prompt == "a yellow star" and vary.status.value == "succeeded"
    assert await stack.balance(user) == balance_before - vary.cost
    # Delivered to the chat it came from, once, with its own buttons.
    await fake.wait_call("sendPhoto", chat=user, n=2)
    await asyncio.sleep(1.5)  # a second post would come within the delivery loop's pass
    photos = fake.calls_of("sendPhoto", "sendDocument", "sendMediaGroup", chat=user)
    assert len(photos) == 2
    assert VARY_REGION in [b["text"] for b in photos[-1].buttons()]

    # The mask is applied: inside it the picture changed, outside it every pixel is kept.
    (made,) = stack.images(vary.id)
    result_png = stack.blobs.get(made.blob_key)
    text = read_png_infotext(result_png)
    assert text is not None and parse_infotext(text).extra.get("Edit") == "Vary (Region)"
    assert "Edit: Vary (Region)" in made.infotext
    before = np.asarray(PILImage.open(io.BytesIO(stack.blobs.get(original.blob_key)))
                        .convert("RGB"), dtype=np.int16)
    after = np.asarray(PILImage.open(io.BytesIO(result_png)).convert("RGB"), dtype=np.int16)
    mask = np.asarray(PILImage.open(io.BytesIO(request.mask or b"")).convert("L"))
    assert mask.shape == (64, 64) and (mask > 0).sum() > 0
    diff = np.abs(after - before).max(axis=2)
    assert diff[mask == 0].max() <= OUTSIDE_TOLERANCE
    assert diff[mask == 255].mean() > 10  # the region was really repainted

    # The same result is in the gallery, with the edit in its parameters.
    await page.click("a.new-image")
    await page.wait_for_selector("#params")
    assert "Vary (Region)" in await page.inner_text("#infotext")

    # For the screenshots, a picture one can see (the tiny model draws noise) of the account.
    person = Person(first.account_id, first.identity_id or 0, "telegram", str(user))
    (picture,) = add_job(stack.sessions, stack.blobs, person, "a harbour at dusk",
                         data=png((200, 120, 60), 512))
    await page.goto(f"{url}/gallery/image/{picture.id}/vary")
    await page.wait_for_selector("#vary[data-ready='1']")
    box = await page.locator("#mask").bounding_box()
    assert box is not None
    await _drag(page, box, [(0.3, 0.42), (0.45, 0.45), (0.6, 0.52)])
    await page.screenshot(path=str(tmp_path / "vary-region-desktop.png"))
    assert errors == []
    cookies = await context.cookies()
    await context.close()

    # On a phone: the editor fits the screen and a finger paints.
    phone = await browser.new_context(viewport={"width": 390, "height": 844},
                                      device_scale_factor=2, is_mobile=True, has_touch=True)
    await phone.add_cookies(cookies)
    page = await phone.new_page()
    errors = _watch_errors(page)
    await page.goto(f"{url}/gallery/image/{picture.id}/vary")
    await page.wait_for_selector("#vary[data-ready='1']")
    box = await page.locator("#mask").bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390
    assert await page.evaluate(
        "() => document.scrollingElement.scrollWidth - window.innerWidth") <= 0
    assert await page.evaluate(
        "() => getComputedStyle(document.getElementById('mask')).touchAction") == "none"
    await page.touchscreen.tap(box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.4)
    assert await page.evaluate(PAINTED) > 0
    await _drag(page, box, [(0.3, 0.42), (0.45, 0.45), (0.6, 0.52)])
    await page.screenshot(path=str(tmp_path / "vary-region-phone.png"))
    assert errors == []
    await phone.close()
    if os.environ.get("ATELIER_UPDATE_DOCS") == "1":  # refresh the docs' screenshots on request
        for name in ("vary-region-desktop.png", "vary-region-phone.png"):
            shutil.copy(tmp_path / name, DOCS / name)


async def test_vary_region_from_discord_goes_back_to_its_channel(
    discord_stack: DiscordStack,
) -> None:
    """The Discord button: its owner only, the link by DM; the job made on the web is posted
    in the channel the image was asked in (its interaction is not needed), once."""
    stack, fake = discord_stack, discord_stack.fake
    _, result = await imagine(stack, seed=5)
    (first,) = await stack.finished(1)
    (image,) = stack.images(first.id)
    refused = await press(stack, BOB, result, Action.vary_region, "1")
    assert (await answer_of(stack, refused)).json["content"] == texts.NOT_YOURS
    pressed = await press(stack, ALICE, result, Action.vary_region, "1")
    assert "private" in (await answer_of(stack, pressed)).json["content"]
    dm = await fake.wait_for(
        lambda: next((c for c in fake.calls_to("POST /channels/{channel}/messages")
                      if "/v/" in (c.json or {}).get("content", "")), None),
        30,
        "the DM with the link",
    )
    assert int(dm.path.split("/")[2]) in fake.dm_channels
    base = stack.settings.public_base_url
    link = dm.json["content"].split()[-1]
    assert link.startswith(f"{base}/v/")

    # The web app over the same store and client, as `atelier up` serves it.
    ctx = WebContext(settings=stack.settings, sessions=stack.sessions, blobs=stack.blobs,
                     client=stack.client)
    transport = httpx.ASGITransport(app=create_app(ctx))
    async with httpx.AsyncClient(transport=transport, base_url=base) as http:
        opened = await http.get(link.removeprefix(base))
        assert opened.headers["location"] == f"/gallery/image/{image.id}/vary"

        class _Req:
            cookies = dict(http.cookies)

        painted = PILImage.new("L", (64, 64), 0)
        painted.paste(255, (16, 16, 48, 48))
        mask = io.BytesIO()
        painted.save(mask, "PNG")
        posted = await http.post(
            f"/gallery/image/{image.id}/vary",
            data={"csrf": csrf_token(ctx, _Req()), "nonce": "d1", "prompt": "a green circle"},
            files={"mask": ("mask.png", mask.getvalue(), "image/png")},
        )
        assert posted.status_code == 200, posted.text
    jobs = await stack.finished(2)
    assert stack.request_of(jobs[-1]).edit is Edit.vary_region
    channel_route = "POST /channels/{channel}/messages"
    post = await fake.wait_for(
        lambda: next((c for c in fake.calls_to(channel_route)
                      if c.files and c.path.split("/")[2] == str(p.PLAIN_CHANNEL)), None),
        90,
        "the result in the channel",
    )
    assert str(ALICE) in post.json["content"]  # the asker is pinged: the result is theirs
    await asyncio.sleep(1.5)
    assert len([c for c in fake.calls_to(channel_route) if c.files]) == 1
