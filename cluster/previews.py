"""The control-map preview people see with a ControlNet result: what the preprocessor made of
their picture (the Canny edges, the scribble's lines) at the size the model drew, as the worker
gave it to the ControlNet. Made once per picture, preprocessor and size, and kept in a blob
store of its own (named by the hash of what it is made of); blocking, so front ends call it
through ``Jobs.control_preview`` (off the event loop)."""

from __future__ import annotations

import hashlib

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
