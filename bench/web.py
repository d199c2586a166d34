"""The gallery's speed (a script, not a test): a gallery of 10,000 images, its first page and
a prompt search, p50/p99 time in the app (the ASGI app called in-process, so the figure is the
server's time, not a network's), on SQLite and on PostgreSQL; and a ZIP of 1,000 images
streamed, peak RSS growth measured side by side with the same ZIP built in memory.

``.venv/bin/python -m bench.web [--images 10000] [--zip 1000] [--rounds 200]``
(PostgreSQL at ATELIER_TEST_PG_URL, default postgresql://postgres@127.0.0.1:5432/test; a
fresh database is made and dropped). Goals: p99 <= 50 ms; ZIP RSS growth <= 64 MB."""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import psycopg
import sqlalchemy as sa
from PIL import Image as PILImage

from cluster.broker_memory import MemoryBroker
from cluster.client import Client
from cluster.registry import ModelRegistry
from core.infotext import png_with_infotext
from core.jobs import DeliveryTarget, JobStatus
from core.prompts import default_blocklist
from core.request import GenerationRequest
from core.settings import Settings, load_settings
from core.signing import sign
from core.styles import default_registry
from storage.blobs import BlobStore
from storage.db import make_engine, session_factory, transaction, upgrade
from storage.models import Image, Job
from tests.web.helpers import Person, make_person
from web.app import create_app
from web.context import WebContext

PG_ADMIN = os.environ.get("ATELIER_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
WORDS = (  # noqa: SIM905 - a paragraph of words reads better than a list of strings
    "red blue green golden silver misty quiet stormy ancient neon tiny giant fox owl whale "
    "castle harbour forest desert city garden lighthouse mountain river bridge tower robot "
    "dragon cat dog horse ship train portrait landscape sunset sunrise night winter summer "
    "autumn spring rain snow fog watercolor oil sketch anime photo cinematic glowing dark "
    "bright soft sharp detailed minimal baroque gothic futuristic retro cozy lonely crowded"
).split()
STYLES = ["anime", "watercolor", "photo", "oil", ""]
NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


def seed_gallery(sessions: Any, person: Person, n: int, blob_key: str, sha: str) -> None:
    """``n`` images (4 per job) in bulk, all naming one blob (the page reads rows, not files)."""
    rng = random.Random(7)
    request_json = GenerationRequest(prompt="x", width=512, height=512).model_dump_json()
    delivery_json = DeliveryTarget(frontend=person.platform).model_dump_json()
    jobs, images = [], []
    for j in range(n // 4):
        when = NOW + timedelta(seconds=j)
        job_id = uuid.uuid4().hex
        jobs.append({"id": job_id, "idempotency_key": job_id, "account_id": person.account_id,
                     "identity_id": person.identity_id, "request_json": request_json,
                     "status": JobStatus.succeeded, "attempts": 1, "delivery_json": delivery_json,
                     "cost": 4, "created_at": when, "updated_at": when, "finished_at": when,
                     "delivered_at": when})
        prompt = " ".join(rng.choice(WORDS) for _ in range(10))
        style = rng.choice(STYLES)
        for i in range(4):
            images.append({"job_id": job_id, "account_id": person.account_id, "index": i,
                           "seed": j * 4 + i, "width": 512, "height": 512, "blob_key": blob_key,
                           "sha256": sha, "prompt": prompt, "negative": "", "styles": style,
                           "model": "sd15", "infotext": f"{prompt}\nSteps: 20, Seed: {j}",
                           "created_at": when})
    with transaction(sessions) as s:
        for start in range(0, len(jobs), 1000):
            s.execute(sa.insert(Job), jobs[start:start + 1000])
        for start in range(0, len(images), 2000):
            s.execute(sa.insert(Image), images[start:start + 2000])
        # What gallery.add_images also writes: the platform, and a row per style (one here).
        s.execute(sa.text("UPDATE images SET platform = :p WHERE account_id = :a"),
                  {"p": person.platform, "a": person.account_id})
        s.execute(sa.text(
            "INSERT INTO image_styles (image_id, style, account_id, created_at) "
            "SELECT id, styles, account_id, created_at FROM images "
            "WHERE account_id = :a AND styles <> ''"), {"a": person.account_id})


def noise_png(side: int) -> bytes:
    """A photo-like (incompressible) PNG, so the ZIP moves realistic amounts of data."""
    pixels = np.random.default_rng(1).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    PILImage.fromarray(pixels).save(out, "PNG", compress_level=1)
    return out.getvalue()


def seed_zip_gallery(sessions: Any, blobs: BlobStore, person: Person, n: int) -> int:
    """``n`` distinct stored PNGs (same pixels, each its own infotext); returns their bytes."""
    base = noise_png(384)
    request_json = GenerationRequest(prompt="x").model_dump_json()
    delivery_json = DeliveryTarget(frontend=person.platform).model_dump_json()
    total = 0
    with transaction(sessions) as s:
        for k in range(n):
            body = png_with_infotext(base, f"zip image {k}\nSteps: 20, Seed: {k}, Size: 384x384")
            total += len(body)
            key = blobs.put(body)
            job_id = uuid.uuid4().hex
            when = NOW + timedelta(seconds=k)
            s.execute(sa.insert(Job), [{
                "id": job_id, "idempotency_key": job_id, "account_id": person.account_id,
                "identity_id": person.identity_id, "request_json": request_json,
                "status": JobStatus.succeeded, "attempts": 1, "delivery_json": delivery_json,
                "cost": 1, "created_at": when, "updated_at": when}])
            s.execute(sa.insert(Image), [{
                "job_id": job_id, "account_id": person.account_id, "index": 0, "seed": k,
                "width": 384, "height": 384, "blob_key": key,
                "sha256": key.rsplit("/", 1)[1][:64], "prompt": f"zip image {k}",
                "negative": "", "styles": "", "model": "sd15", "infotext": "", "created_at": when}])
    return total


class Asgi:
    """Calls the app in-process and throws the body away as it comes (nothing buffered)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def get(self, path: str, cookie: str) -> tuple[int, int]:
        target, _, query = path.partition("?")
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": "GET", "scheme": "http", "path": target, "raw_path": target.encode(),
                 "query_string": query.encode(), "root_path": "",
                 "headers": [(b"host", b"127.0.0.1:8000"), (b"cookie", cookie.encode())],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}
        status, size = 0, 0
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await asyncio.Event().wait()  # no disconnect while the response streams
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status, size
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                size += len(message.get("body", b""))

        await self.app(scope, receive, send)
        return status, size


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return statistics.median(ordered), p99


async def timed(client: Asgi, path: str, cookie: str, rounds: int) -> tuple[float, float]:
    for _ in range(5):  # warm caches and the connection pool
        await client.get(path, cookie)
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        status, _ = await client.get(path, cookie)
        samples.append((time.perf_counter() - start) * 1000)
        assert status == 200, (path, status)
    return percentiles(samples)


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRss:
    """The highest RSS seen (sampled every 2 ms) while the block runs, above where it began."""

    def __enter__(self) -> PeakRss:
        self.start = rss_bytes()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def app_over(settings: Settings, db_url: str) -> tuple[Any, Any, BlobStore, Callable[[], None]]:
    upgrade(db_url)
    engine = make_engine(db_url)
    sessions = session_factory(engine)
    blobs = BlobStore.from_settings(settings)
    client = Client(settings=settings, session_factory=sessions, broker=MemoryBroker(),
                    blobs=blobs,
                    models=ModelRegistry.load(settings),
                    styles=default_registry(),
                    blocklist=default_blocklist(),)
    app = create_app(WebContext(settings=settings, sessions=sessions, blobs=blobs, client=client))
    return app, sessions, blobs, engine.dispose


def cookie_for(settings: Settings, account_id: int) -> str:
    value = sign(settings.resolved_signing_key, subject=str(account_id),
                 purpose="gallery-session", now=datetime.now(UTC), ttl=timedelta(hours=1))
    return f"atelier_session={value}"


async def bench_pages(settings: Settings, db_url: str, n: int, rounds: int) -> list[str]:
    app, sessions, blobs, close = app_over(settings, db_url)
    try:
        me = make_person(sessions)
        key = blobs.put(noise_png(64))
        started = time.perf_counter()
        seed_gallery(sessions, me, n, key, key.rsplit("/", 1)[1][:64])
        if db_url.startswith("postgresql"):
            with transaction(sessions) as s:
                s.execute(sa.text("ANALYZE"))
        seeded = time.perf_counter() - started
        client = Asgi(app)
        cookie = cookie_for(settings, me.account_id)
        out = [f"  {n} images seeded in {seeded:.1f} s"]
        for label, path in (("first page", "/gallery"),
                            ("search 'castle sunset'", "/gallery?q=castle+sunset"),
                            ("style filter", "/gallery?style=anime"),
                            ("page 50 (cursor)", None)):
            if path is None:
                path = "/gallery"
                for _ in range(49):  # follow the cursor as the scroll would
                    body = await _body(app, path, cookie)
                    href = body.split('id="more" href="')[1].split('"')[0]
                    path = href.replace("&amp;", "&")
            p50, p99 = await timed(client, path, cookie, rounds)
            verdict = "ok" if p99 <= 50 else "OVER"
            out.append(f"  {label:<24} p50 {p50:6.1f} ms  p99 {p99:6.1f} ms  "
                       f"(goal p99 <= 50 ms: {verdict})")
        return out
    finally:
        close()


async def _body(app: Any, path: str, cookie: str) -> str:
    import httpx

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as h:
        return (await h.get(path, headers={"cookie": cookie})).text


async def bench_zip(settings: Settings, n: int) -> list[str]:
    app, sessions, blobs, close = app_over(settings, settings.db_url)
    try:
        me = make_person(sessions)
        total = seed_zip_gallery(sessions, blobs, me, n)
        client = Asgi(app)
        cookie = cookie_for(settings, me.account_id)
        await client.get("/gallery", cookie)  # import and warm everything first
        with PeakRss() as streamed:
            started = time.perf_counter()
            status, size = await client.get("/gallery/zip?all=1", cookie)
            took = time.perf_counter() - started
        assert status == 200 and size > total, (status, size, total)
        with PeakRss() as in_ram:  # the same archive built whole in memory, for comparison
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
                for path in _blob_paths(blobs):
                    zf.write(path, path.name)
            del buf
        verdict = "ok" if streamed.growth_mb <= 64 else "OVER"
        return [
            f"  {n} PNGs, {total / 2**20:.0f} MB: streamed in {took:.1f} s, {size / 2**20:.0f} MB",
            f"  peak RSS growth: streamed {streamed.growth_mb:.1f} MB (goal <= 64 MB: {verdict})"
            f" vs built in memory {in_ram.growth_mb:.1f} MB"
            f" ({in_ram.growth_mb / max(streamed.growth_mb, 0.1):.0f}x)",
        ]
    finally:
        close()


def _blob_paths(blobs: BlobStore) -> Iterator[Path]:
    yield from sorted(blobs.root.glob("??/??/*.png"))


def pg_database() -> tuple[str, Callable[[], None]] | None:
    try:
        with psycopg.connect(PG_ADMIN, connect_timeout=3, autocommit=True) as conn:
            name = f"atelier_bench_{uuid.uuid4().hex[:10]}"
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error as exc:
        print(f"PostgreSQL at {PG_ADMIN} unreachable ({str(exc).splitlines()[0]}): skipped")
        return None

    def drop() -> None:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return PG_ADMIN.rsplit("/", 1)[0] + f"/{name}", drop


async def main(images: int, zip_images: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="atelier-bench-web-") as tmp:
        settings = load_settings(data_dir=Path(tmp) / "sqlite", _env_file=None)
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"gallery of {images} images, {rounds} requests each, time inside the app "
              f"(load average {load} on {os.cpu_count()} CPUs: p99 is mostly the machine's)")
        print("SQLite:")
        for line in await bench_pages(settings, settings.db_url, images, rounds):
            print(line)
        pg = pg_database()
        if pg is not None:
            url, drop = pg
            try:
                print("PostgreSQL:")
                pg_settings = load_settings(data_dir=Path(tmp) / "pg", _env_file=None)
                for line in await bench_pages(pg_settings, url, images, rounds):
                    print(line)
            finally:
                drop()
        print(f"ZIP of {zip_images} images (SQLite store):")
        zip_settings = load_settings(data_dir=Path(tmp) / "zip", _env_file=None)
        for line in await bench_zip(zip_settings, zip_images):
            print(line)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--zip", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    asyncio.run(main(args.images, args.zip, args.rounds))
