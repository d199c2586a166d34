"""Uploaded image validation that is safe against decompression bombs and hostile files: size checks
before any pixel is decoded, then a fresh PNG re-encode that carries no metadata.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from typing import Final

from PIL import Image, ImageOps, UnidentifiedImageError

from core.errors import ImageRejected, UnreadableImage

ACCEPTED_FORMATS: Final = ("PNG", "JPEG", "WEBP")
# Fast compression: these PNGs are working copies for the engine, and a 16-megapixel upload
# takes seconds at Pillow's default level.
_PNG_COMPRESS_LEVEL: Final = 1


@dataclass(frozen=True)
class ValidatedImage:
    """An accepted upload: a metadata-free PNG, its size after EXIF rotation, and what it was."""

    png: bytes
    width: int
    height: int
    original_format: str


def validate_image(
    data: bytes, *, max_bytes: int, max_pixels: int, purpose: str = "image"
) -> ValidatedImage:
    """Check an upload and re-encode it as an RGB PNG; raise ImageRejected saying what is wrong."""
    img, original_format = _open_checked(data, max_bytes, max_pixels, purpose)
    rgb = _flatten(img, background=(255, 255, 255)).convert("RGB")
    return _reencode(rgb, original_format)


def validate_mask(
    data: bytes, *, max_bytes: int, max_pixels: int, purpose: str = "mask"
) -> ValidatedImage:
    """Like ``validate_image`` but returns an L-mode PNG (white = repaint).

    Transparent areas count as black, so a mask painted on a transparent canvas keeps what is
    not painted.
    """
    img, original_format = _open_checked(data, max_bytes, max_pixels, purpose)
    if img.mode.startswith("I"):
        gray = _to_8bit(img)
    else:
        gray = _flatten(img, background=(0, 0, 0)).convert("L")
    return _reencode(gray, original_format)


def decode_png_rgb(png: bytes) -> Image.Image:
    """Decode a PNG made by ``validate_image`` (or the engine) into a loaded RGB image."""
    return _decode_png(png).convert("RGB")


def decode_png_mask(png: bytes) -> Image.Image:
    """Decode a PNG made by ``validate_mask`` into a loaded L-mode image."""
    return _decode_png(png).convert("L")


def _decode_png(png: bytes) -> Image.Image:
    try:
        with _bomb_warnings_as_errors():
            img = Image.open(BytesIO(png), formats=["PNG"])
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _too_many_pixels("PNG", Image.MAX_IMAGE_PIXELS or 0) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageRejected(f"the PNG could not be decoded: {exc}") from None
    return img


@contextmanager
def _bomb_warnings_as_errors() -> Iterator[None]:
    # Pillow only *warns* between MAX_IMAGE_PIXELS and twice that; make it an exception we can
    # turn into ImageRejected rather than a warning reaching the logs (or failing a test run).
    # catch_warnings swaps a process-wide filter list; should a concurrent thread restore it
    # under us, the warning may be shown, but our own pixel cap still rejects the image.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def _too_many_pixels(purpose: str, max_pixels: int) -> ImageRejected:
    # Pillow's own MAX_IMAGE_PIXELS guard fired: name whichever cap is the lower.
    pillow_cap = Image.MAX_IMAGE_PIXELS or max_pixels
    return ImageRejected(
        f"the {purpose} declares too many pixels; the limit is {min(max_pixels, pillow_cap)} pixels"
    )


def _megabytes(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MB"


def _open_checked(
    data: bytes, max_bytes: int, max_pixels: int, purpose: str
) -> tuple[Image.Image, str]:
    """Open and fully decode ``data`` after checking its byte and pixel counts; EXIF-rotated."""
    if not data:
        raise ImageRejected(f"the {purpose} is empty")
    if len(data) > max_bytes:
        raise ImageRejected(
            f"the {purpose} is too large: {_megabytes(len(data))}; "
            f"the limit is {_megabytes(max_bytes)}"
        )

    try:
        with _bomb_warnings_as_errors():
            # Opening reads only the header: size and mode, no pixels yet.
            img = Image.open(BytesIO(data), formats=list(ACCEPTED_FORMATS))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _too_many_pixels(purpose, max_pixels) from None
    except UnidentifiedImageError:
        raise UnreadableImage("only PNG, JPEG or WebP images are accepted") from None
    except (OSError, SyntaxError, ValueError, EOFError):
        # A known format whose header chunks are broken, or Pillow's cap on text chunks
        # (MAX_TEXT_CHUNK / MAX_TEXT_MEMORY) refusing a metadata bomb.
        raise UnreadableImage(
            f"the {purpose} file is corrupt or carries too much metadata"
        ) from None

    width, height = img.size
    if width * height > max_pixels:
        img.close()
        raise ImageRejected(
            f"the {purpose} is {width}x{height} pixels ({width * height}); "
            f"the limit is {max_pixels} pixels"
        )
    original_format = img.format or "unknown"

    try:
        with _bomb_warnings_as_errors():
            # LOAD_TRUNCATED_IMAGES is left at False, so a short file raises here.
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _too_many_pixels(purpose, max_pixels) from None
    except (OSError, SyntaxError, ValueError, EOFError):
        raise UnreadableImage(f"the {purpose} file is truncated or corrupt") from None

    return _exif_upright(img), original_format


def _exif_upright(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except Exception:
        # A malformed EXIF block is dropped anyway; it should not sink an otherwise good image.
        return img


def _flatten(img: Image.Image, *, background: tuple[int, int, int]) -> Image.Image:
    """Composite an image with transparency onto ``background``; others pass through."""
    if img.mode.startswith("I"):
        return _to_8bit(img)
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode == "P" and "transparency" in img.info
    )
    if not has_alpha:
        return img
    rgba = img.convert("RGBA")
    base = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(base, rgba)


def _to_8bit(img: Image.Image) -> Image.Image:
    # 16-bit grayscale PNGs: scale into 0..255 rather than let convert() clip them to white.
    return img.convert("I").point(lambda v: v / 256).convert("L")


def _reencode(img: Image.Image, original_format: str) -> ValidatedImage:
    # A fresh image from raw pixels has an empty .info: no EXIF, GPS, XMP, ICC or text survives.
    fresh = Image.frombytes(img.mode, img.size, img.tobytes())
    buf = BytesIO()
    fresh.save(buf, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)
    return ValidatedImage(
        png=buf.getvalue(), width=fresh.width, height=fresh.height, original_format=original_format
    )
