"""The control-map preview people see with a ControlNet result: what the preprocessor made of
their picture (the Canny edges, the scribble's lines) at the size the model drew, as the worker
gave it to the ControlNet. Made once per picture, preprocessor and size, and kept in a blob
store of its own (named by the hash of what it is made of); blocking, so front ends call it
through ``Jobs.control_preview`` (off the event loop). A preview is a cache of what the job's
request can make again: ``atelier db prune`` removes those not read for the retention period
(``prune_previews``), and the gallery makes one again if it is asked for."""

from __future__ import annotations

import contextlib
import hashlib
from datetime import datetime

from core.control import ControlUnit, control_map, control_png
from core.images import decode_png_rgb
from core.request import GenerationRequest
from storage.blobs import BlobStore

PREVIEW_DIR = "control"  # under the blob dir, apart from the content-addressed images


def preview_store(blobs: BlobStore) -> BlobStore:
    return BlobStore(blobs.root / PREVIEW_DIR)


def preview_key(unit: ControlUnit, width: int, height: int) -> str:
    """The preview's name: the hash of the picture and of everything that shapes its map."""
    made_of = hashlib.sha256(unit.image)
    made_of.update(f"|{unit.preprocessor}|{unit.low}|{unit.high}|{width}x{height}".encode())
    digest = made_of.hexdigest()
    return f"{digest[:2]}/{digest[2:4]}/{digest}.png"


def control_preview(blobs: BlobStore, request: GenerationRequest) -> bytes | None:
    """The PNG of ``request``'s control map (None without a control unit), made on first
    request and read back after."""
    unit = request.control
    if unit is None:
        return None
    if request.width is not None and request.height is not None:
        width, height = request.width, request.height
    else:  # an unresolved request: the picture's own size
        width, height = decode_png_rgb(unit.image).size
    store, key = preview_store(blobs), preview_key(unit, width, height)
    if store.exists(key):
        return store.get(key)
    png = control_png(control_map(unit, width, height))
    store.put_named(key, png)
    return png


def prune_previews(blobs: BlobStore, *, before: datetime) -> int:
    """Remove the previews last written or read before ``before`` (and the folders left
    empty); returns how many. Safe at any time: a preview asked for again is made again."""
    root = preview_store(blobs).root
    cutoff = before.timestamp()
    removed = 0
    for path in sorted(root.rglob("*.png")):
        with contextlib.suppress(FileNotFoundError):
            stat = path.stat()
            if max(stat.st_mtime, stat.st_atime) < cutoff:
                path.unlink()
                removed += 1
    for folder in sorted((d for d in root.rglob("*") if d.is_dir()), reverse=True):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only empty ones go
    return removed
