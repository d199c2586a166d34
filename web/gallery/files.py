"""Image bytes for the gallery: WebP thumbnails made once and kept in a blob store of their
own (named by the source image's hash), and ZIPs streamed one image at a time."""

from __future__ import annotations

import io
import logging
import re
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from PIL import Image as PILImage

from core.errors import NotFound
from storage.blobs import BlobStore, sha256_of
from storage.gallery import ImageRead

THUMB_SIDE = 384
THUMB_QUALITY = 80
THUMB_DIR = "thumbs"
_CHUNK = 64 * 1024
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
# In a ZIP that had to leave images out: which, and why.
SKIPPED_NAME = "NOT-INCLUDED.txt"
SKIPPED_TEXT = "These images' files could not be read, so they are not in this ZIP:\n"
log = logging.getLogger(__name__)


def thumb_store(blobs: BlobStore) -> BlobStore:
    """Thumbnails live under the blob dir, apart from the content-addressed originals."""
    return BlobStore(blobs.root / THUMB_DIR)


def thumb_key(image: ImageRead) -> str:
    digest = sha256_of(image.blob_key)
    return f"{digest[:2]}/{digest[2:4]}/{digest}.webp"


def thumbnail(blobs: BlobStore, image: ImageRead) -> Path:
    """The image's thumbnail file, made on first request (blocking: call off the loop)."""
    store = thumb_store(blobs)
    key = thumb_key(image)
    if store.exists(key):
        return store.path(key)
    with PILImage.open(blobs.path(image.blob_key)) as im:
        im.thumbnail((THUMB_SIDE, THUMB_SIDE))
        out = io.BytesIO()
        im.convert("RGB").save(out, "WEBP", quality=THUMB_QUALITY, method=4)
    store.put_named(key, out.getvalue())
    return store.path(key)


def delete_blobs(blobs: BlobStore, keys: Iterable[str]) -> None:
    """Remove images no live gallery row uses any more, and their thumbnails."""
    thumbs = thumb_store(blobs)
    for key in keys:
        blobs.delete(key)
        digest = sha256_of(key)
        thumbs.delete(f"{digest[:2]}/{digest[2:4]}/{digest}.webp")


def download_name(image: ImageRead) -> str:
    """A file name that says what the picture is, safe in any file system and header."""
    words = _UNSAFE.sub("-", image.prompt[:40]).strip("-._") or "image"
    return f"{image.id}-{words}-{image.seed}.png"


class _Pipe(io.RawIOBase):
    """A write-only stream whose bytes are taken out as they come (never all in memory)."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._written = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self._chunks.append(bytes(data))
        self._written += len(data)
        return len(data)

    def tell(self) -> int:
        return self._written

    def take(self) -> bytes:
        out = b"".join(self._chunks)
        self._chunks.clear()
        return out


def stream_zip(blobs: BlobStore, images: Iterable[ImageRead]) -> Iterator[bytes]:
    """A ZIP of ``images`` (PNGs with their infotext, stored uncompressed: PNG is already
    compressed), produced as it is sent: memory holds one chunk, not the archive. An image
    whose file cannot be read is left out and named in ``SKIPPED_NAME`` inside the ZIP (the
    200 went out with the first bytes: failing then would cut the download off)."""
    pipe = _Pipe()
    names: set[str] = set()
    skipped: list[str] = []
    with zipfile.ZipFile(pipe, "w", compression=zipfile.ZIP_STORED) as zf:  # type: ignore[arg-type]
        for image in images:
            name = download_name(image)
            if name in names:  # a repeated id in a selection: once is enough
                continue
            names.add(name)
            try:
                src = blobs.path(image.blob_key).open("rb")
            except (NotFound, OSError) as exc:
                log.warning("zip: image %d left out: %s", image.id, exc)
                skipped.append(name)
                continue
            info = zipfile.ZipInfo(name, date_time=image.created_at.timetuple()[:6])
            info.compress_type = zipfile.ZIP_STORED
            with src, zf.open(info, "w") as dst:
                while chunk := src.read(_CHUNK):
                    dst.write(chunk)
                    if out := pipe.take():
                        yield out
            if out := pipe.take():
                yield out
        if skipped:
            zf.writestr(SKIPPED_NAME, SKIPPED_TEXT + "".join(f"{n}\n" for n in skipped))
    yield pipe.take()  # the central directory, written as the archive closes
