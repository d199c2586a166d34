"""Images as Discord attachments within the place's upload limit (``attachment_size_limit``,
10 MiB by default): a PNG that is too large goes as a WebP (then a smaller JPEG), and one that
still does not fit is left out, for the gallery link to carry it. Never a failed upload."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

DEFAULT_LIMIT = 10 * 1024 * 1024
# A message's files share one request: Discord refuses the whole message over the limit, so
# files are fitted one by one and the message may carry fewer of them.
_SMALLER = (("WEBP", 90), ("JPEG", 85), ("JPEG", 70))


@dataclass(frozen=True, slots=True)
class Fitted:
    """One image ready to attach: its bytes and file name (``.png``, ``.webp`` or ``.jpg``);
    ``reformatted``: it is not the original PNG (which the gallery keeps)."""

    data: bytes
    filename: str
    reformatted: bool = False


def fit(png: bytes, filename: str, limit: int = DEFAULT_LIMIT) -> Fitted | None:
    """``png`` as it is when it fits ``limit``, else in a smaller format; None if none fits."""
    if len(png) <= limit:
        return Fitted(png, filename)
    stem = filename.rsplit(".", 1)[0]
    with Image.open(io.BytesIO(png)) as image:
        image.load()
        rgb = image.convert("RGB")
    for fmt, quality in _SMALLER:
        out = io.BytesIO()
        rgb.save(out, format=fmt, quality=quality)
        if out.tell() <= limit:
            suffix = ".webp" if fmt == "WEBP" else ".jpg"
            return Fitted(out.getvalue(), stem + suffix, reformatted=True)
    return None


def fit_all(
    items: Sequence[tuple[bytes, str]], limit: int = DEFAULT_LIMIT
) -> tuple[list[tuple[int, Fitted]], list[int]]:
    """Fit each image and keep the total under ``limit``: the attached files with their
    (0-based) positions, and the positions of those left out."""
    fitted: list[tuple[int, Fitted]] = []
    left_out: list[int] = []
    total = 0
    for i, (png, name) in enumerate(items):
        one = fit(png, name, limit)
        if one is None or total + len(one.data) > limit:
            left_out.append(i)
            continue
        fitted.append((i, one))
        total += len(one.data)
    return fitted, left_out
