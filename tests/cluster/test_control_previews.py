"""The control-map preview (cluster/previews.py): what the worker gives the ControlNet, at the
job's size, made on first request and read back after; none for a job without control."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cluster.previews import control_preview, preview_key, preview_store
from core.control import ControlUnit, control_map, control_png
from core.images import validate_image
from core.request import GenerationRequest
from storage.blobs import BlobStore


def picture() -> bytes:
    img = Image.new("RGB", (96, 64), "white")
    ImageDraw.Draw(img).ellipse((10, 10, 50, 50), outline="black", width=3)
    return validate_image(control_png(img), max_bytes=10**6, max_pixels=10**6).png


def request(**unit: object) -> GenerationRequest:
    control = ControlUnit(controlnet="edges", image=picture(), **unit)  # type: ignore[arg-type]
    return GenerationRequest(prompt="a red circle", width=96, height=64, control=control)


def test_the_preview_is_the_map_at_the_jobs_size(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs")
    wanted = request(preprocessor="canny")
    png = control_preview(blobs, wanted)
    assert png is not None
    shown = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert wanted.control is not None
    assert (shown == np.asarray(control_map(wanted.control, 96, 64))).all()
    assert set(np.unique(shown)) == {0, 255}  # edges, not the picture
    # Another preprocessor or size is another map.
    other = control_preview(blobs, request(preprocessor="scribble"))
    assert other is not None and other != png


def test_the_preview_is_made_once(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs")
    wanted = request(preprocessor="canny")
    assert wanted.control is not None
    first = control_preview(blobs, wanted)
    store, key = preview_store(blobs), preview_key(wanted.control, 96, 64)
    assert store.get(key) == first
    # What is stored is what is shown after: the map is not made again.
    store.put_named(key, b"kept")
    assert control_preview(blobs, wanted) == b"kept"
    assert not (tmp_path / "blobs" / key).exists()  # apart from the images


def test_no_preview_without_control(tmp_path: Path) -> None:
    assert control_preview(BlobStore(tmp_path), GenerationRequest(prompt="a boat")) is None


def test_previews_not_used_for_the_retention_period_are_pruned_and_made_again(
    tmp_path: Path,
) -> None:
    import os
    from datetime import UTC, datetime, timedelta

    from cluster.previews import prune_previews

    blobs = BlobStore(tmp_path / "blobs")
    old, fresh = request(preprocessor="canny"), request(preprocessor="scribble")
    assert old.control is not None and fresh.control is not None
    made = control_preview(blobs, old)
    control_preview(blobs, fresh)
    store = preview_store(blobs)
    old_path = store.path(preview_key(old.control, 96, 64))
    long_ago = (datetime.now(UTC) - timedelta(days=100)).timestamp()
    os.utime(old_path, (long_ago, long_ago))

    assert prune_previews(blobs, before=datetime.now(UTC) - timedelta(days=90)) == 1
    assert not old_path.exists() and not old_path.parent.exists()  # its empty folders too
    assert store.exists(preview_key(fresh.control, 96, 64))
    assert control_preview(blobs, old) == made  # asked for again: made again
