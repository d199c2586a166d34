"""The gallery in a real headless Chromium (Debian's, driven by Playwright) against the app
served by uvicorn over a real store, with a local Ray worker running the tiny pipeline and a
dispatcher: sign in by link, grid, search, filter, scroll, image page, download, ZIP, make
again with live progress, delete, and a phone-sized screen. Screenshots are kept."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from cluster.broker_memory import MemoryBroker
from cluster.client import Client
from cluster.dispatcher import Dispatcher, Pacing
from cluster.placement import WorkerPool
from cluster.registry import ModelRegistry
from core.infotext import parse_infotext, read_png_infotext
from core.prompts import default_blocklist
from core.settings import Settings, load_settings
from core.styles import default_registry
from storage.blobs import BlobStore
from storage.db import make_engine, session_factory, upgrade
from tests.conftest import service_missing
from tests.web.helpers import NOW, add_job, gallery_link, make_person
from web.app import create_app
from web.context import WebContext

CHROMIUM = Path("/usr/bin/chromium")
DOCS_SHOT = Path(__file__).resolve().parents[2] / "docs" / "gallery.png"


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


@dataclass
class Live:
    url: str
    settings: Settings
    ctx: WebContext
    person_id: int
    ids: list[int]


@pytest.fixture
async def live(tmp_path: Path, web_ray_worker: Any, web_tiny_dir: Path) -> AsyncIterator[Live]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    settings = load_settings(data_dir=data_dir, database_url=f"sqlite:///{tmp_path / 'a.db'}",
                             public_base_url=url, _env_file=None)
    upgrade(settings.db_url)
    engine = make_engine(settings.db_url)
    sessions = session_factory(engine)
    blobs = BlobStore.from_settings(settings)
    registry = ModelRegistry.load(load_settings(data_dir=web_tiny_dir, _env_file=None)).with_models(
        default="tiny")
    broker = MemoryBroker()
    client = Client(settings=settings, session_factory=sessions, broker=broker, blobs=blobs,
                    models=registry, poll_interval_s=0.2,
                    styles=default_registry(),
                    blocklist=default_blocklist(),)
    dispatcher = Dispatcher(
        dispatch=settings.dispatch.model_copy(update={"gather_window_ms": 20}),
        sessions=sessions, broker=broker, blobs=blobs,
        workers=await WorkerPool.from_handles([web_ray_worker]), name="web-test-dispatcher",
        models=registry, pacing=Pacing(read_block_ms=200, progress_interval_s=0.1),
    )
    stop = asyncio.Event()
    running = asyncio.create_task(dispatcher.run(stop))
    me = make_person(sessions)
    ids = []
    styles = ["anime", "watercolor", "photo"]
    for n in range(30):
        prompt = "a red fox in the snow" if n == 5 else f"a quiet harbour, study {n}"
        ids += [i.id for i in add_job(sessions, blobs, me, prompt, styles=[styles[n % 3]],
                                      seed=1000 + n, when=NOW + timedelta(minutes=n))]
    ctx = WebContext(settings=settings, sessions=sessions, blobs=blobs, client=client)
    server = _Server(uvicorn.Config(create_app(ctx), host="127.0.0.1", port=port,
                                    log_level="warning", lifespan="off"))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.05)
    try:
        yield Live(url, settings, ctx, me.account_id, ids)
    finally:
        server.should_exit = True
        await serving
        stop.set()
        await asyncio.wait_for(running, 60)
        await broker.close()
        engine.dispose()


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    if not CHROMIUM.exists():
        service_missing("Chromium at /usr/bin/chromium (apt-get install -y chromium)")
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield b
        finally:
            await b.close()


def _watch_errors(page: Any) -> list[str]:
    """Console errors (a CSP violation shows up as one) and uncaught exceptions."""
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    return errors


@pytest.mark.timeout(300)
async def test_the_gallery_in_a_browser(live: Live, browser: Any, artifacts: Path) -> None:
    context = await browser.new_context(viewport={"width": 1280, "height": 900},
                                        accept_downloads=True)
    page = await context.new_page()
    errors = _watch_errors(page)
    link = gallery_link(live.ctx.signing_key, live.person_id, now=datetime.now(UTC),
                        ttl=timedelta(days=7))

    # Sign in: the link leads to the short URL, the session lives in an HttpOnly cookie.
    await page.goto(live.url + link)
    assert page.url == f"{live.url}/gallery"
    cookie = next(c for c in await context.cookies() if c["name"] == "atelier_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Lax"
    await page.reload()
    cards = page.locator("figure.card")
    assert await cards.first.get_attribute("data-id") == str(live.ids[-1])  # newest first
    # Predicates as functions, not expressions: Playwright (1.65+) evaluates an expression
    # string with eval in the page, which the gallery's CSP (script-src 'self') refuses.
    await page.wait_for_function(
        "() => [...document.querySelectorAll('figure.card img')].slice(0, 8)"
        ".every(i => i.complete && i.naturalWidth > 0)")
    await page.screenshot(path=str(artifacts / "grid.png"))
    if os.environ.get("ATELIER_UPDATE_DOCS") == "1":  # refresh the README's screenshot on request
        DOCS_SHOT.parent.mkdir(exist_ok=True)
        shutil.copy(artifacts / "grid.png", DOCS_SHOT)

    # Without JavaScript: a page of 24 and a plain link to the older ones.
    plain = await browser.new_context(java_script_enabled=False)
    await plain.add_cookies([cookie])
    old_page = await plain.new_page()
    await old_page.goto(f"{live.url}/gallery")
    assert await old_page.locator("figure.card").count() == 24
    await old_page.click("#more")
    assert await old_page.locator("figure.card").count() == 6 and "before=" in old_page.url
    await plain.close()

    # Infinite scroll: the older images join the page without leaving it.
    await page.mouse.wheel(0, 20_000)
    await page.wait_for_function(
        "() => document.querySelectorAll('figure.card').length === 30")
    assert page.url == f"{live.url}/gallery" and await page.locator("#more").count() == 0

    # Search by prompt words, then filter by style.
    await page.fill("input[name=q]", "fox snow")
    await page.click("form.filters button[type=submit]")
    assert await cards.count() == 1
    assert "a red fox in the snow" in await cards.first.inner_text()
    await page.goto(f"{live.url}/gallery")
    await page.select_option("select[name=style]", "watercolor")
    await page.click("form.filters button[type=submit]")
    assert await cards.count() == 10 and "style=watercolor" in page.url

    # ZIP of a selection.
    await page.goto(f"{live.url}/gallery")
    for n in range(3):
        await cards.nth(n).locator("input[type=checkbox]").check()
    async with page.expect_download() as zipped:
        await page.click("#zip-selected")
    zip_path = await (await zipped.value).path()
    with zipfile.ZipFile(zip_path) as zf:
        assert len(zf.namelist()) == 3

    # An image's page: parameters, copy, download with infotext.
    await cards.nth(1).locator("a").click()
    await page.wait_for_selector("#params")
    image_id = int(page.url.rsplit("/", 1)[1])
    seed = await page.inner_text("#seed")
    await context.grant_permissions(["clipboard-read", "clipboard-write"], origin=live.url)
    await page.click("button[data-copy=seed]")
    assert await page.evaluate("navigator.clipboard.readText()") == seed
    async with page.expect_download() as downloaded:
        await page.click("#download")
    png = Path(await (await downloaded.value).path()).read_bytes()
    text = read_png_infotext(png)
    assert text is not None and parse_infotext(text).seed == int(seed)
    await page.screenshot(path=str(artifacts / "image.png"), full_page=True)

    # Make again, keeping the seed: progress over SSE, then the new image.
    await page.check("#make-again input[name=keep_seed]")
    await page.click("#make-again button[type=submit]")
    await page.wait_for_load_state()
    assert "/gallery/job/" in page.url, await page.inner_text("main")
    await page.wait_for_selector("a.new-image", timeout=150_000)
    seen = (await page.get_attribute("#job", "data-seen") or "").split()
    assert seen[-1] == "done" and ("queued" in seen or "started" in seen), seen
    assert await page.inner_text("#status") == "done"
    await page.screenshot(path=str(artifacts / "made.png"))
    await page.click("a.new-image")
    await page.wait_for_selector("#params")
    assert await page.inner_text("#seed") == seed  # the same seed, as asked
    new_id = int(page.url.rsplit("/", 1)[1])
    assert new_id not in live.ids

    # Delete (after the confirmation) takes it out of the grid.
    page.once("dialog", lambda d: asyncio.ensure_future(d.accept()))
    await page.goto(f"{live.url}/gallery/image/{image_id}")
    await page.click("#delete button")
    await page.wait_for_url(f"{live.url}/gallery")
    assert await page.locator(f"figure.card[data-id='{image_id}']").count() == 0
    assert await page.locator(f"figure.card[data-id='{new_id}']").count() == 1
    assert errors == []
    await context.close()


@pytest.mark.timeout(120)
async def test_the_gallery_on_a_phone(live: Live, browser: Any, artifacts: Path) -> None:
    context = await browser.new_context(viewport={"width": 390, "height": 844},
                                        device_scale_factor=2, is_mobile=True, has_touch=True)
    page = await context.new_page()
    errors = _watch_errors(page)
    link = gallery_link(live.ctx.signing_key, live.person_id, now=datetime.now(UTC),
                        ttl=timedelta(days=7))
    await page.goto(live.url + link)
    columns = await page.evaluate(
        "getComputedStyle(document.getElementById('grid')).gridTemplateColumns.split(' ').length")
    assert columns == 2
    overflow = await page.evaluate("document.scrollingElement.scrollWidth - window.innerWidth")
    assert overflow <= 0  # nothing sticks out sideways
    await page.screenshot(path=str(artifacts / "phone-grid.png"))
    await page.locator("figure.card a").first.click()
    await page.wait_for_selector("#params")
    img_box = await page.locator("#full").bounding_box()
    assert img_box is not None and img_box["width"] <= 390
    assert await page.evaluate("document.scrollingElement.scrollWidth - window.innerWidth") <= 0
    await page.screenshot(path=str(artifacts / "phone-image.png"), full_page=True)
    assert errors == []
    await context.close()


