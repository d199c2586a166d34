"""Upload validation: bombs and hostile files are refused before any pixel is decoded; accepted
images come back as metadata-free PNGs, upright.
"""

from __future__ import annotations

import random
import struct
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from io import BytesIO
from typing import Any

import pytest
from PIL import ExifTags, Image, ImageFile
from PIL.PngImagePlugin import PngInfo

from core.errors import ImageRejected
from core.images import (
    ValidatedImage,
    decode_png_mask,
    decode_png_rgb,
    validate_image,
    validate_mask,
)

MB = 1024 * 1024
MAX_BYTES = 20 * MB
MAX_PIXELS = 4096 * 4096
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def pillow_globals_untouched() -> Iterator[None]:
    before = Image.MAX_IMAGE_PIXELS
    yield
    assert before == Image.MAX_IMAGE_PIXELS
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if Pillow is ever asked to decode pixels."""

    def refuse(self: ImageFile.ImageFile) -> Any:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


def check(data: bytes, **kw: Any) -> ValidatedImage:
    kw.setdefault("max_bytes", MAX_BYTES)
    kw.setdefault("max_pixels", MAX_PIXELS)
    return validate_image(data, **kw)


def rejected(fn: Callable[[], object], match: str) -> float:
    """Assert ``fn`` raises ImageRejected matching ``match``, with no warning; return seconds."""
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(ImageRejected, match=match):
            fn()
    assert [str(w.message) for w in seen] == []
    return time.perf_counter() - start


def chunk(ctype: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data))


def png_declaring(width: int, height: int) -> bytes:
    """A well-formed PNG header declaring ``width`` x ``height`` RGB pixels, with a tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return PNG_SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = random.Random(seed)
    return Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))


def chunk_types(png: bytes) -> list[bytes]:
    types, pos = [], len(PNG_SIGNATURE)
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        types.append(png[pos + 4 : pos + 8])
        pos += 12 + length
    return types


def gps_exif(orientation: int | None = None) -> Image.Exif:
    exif = Image.Exif()
    if orientation is not None:
        exif[ExifTags.Base.Orientation] = orientation
    exif[ExifTags.Base.Make] = "PhoneCo"
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = "N"
    gps[ExifTags.GPS.GPSLatitude] = (52.0, 22.0, 1.5)
    gps[ExifTags.GPS.GPSLongitudeRef] = "E"
    gps[ExifTags.GPS.GPSLongitude] = (4.0, 53.0, 2.25)
    return exif


def assert_clean_png(result: ValidatedImage) -> None:
    """Only the pixel chunks survive: no eXIf, iCCP, tEXt/iTXt/zTXt, XMP or anything else."""
    assert result.png.startswith(PNG_SIGNATURE)
    assert set(chunk_types(result.png)) == {b"IHDR", b"IDAT", b"IEND"}
    with Image.open(BytesIO(result.png)) as out:
        assert not out.getexif()
        assert {"exif", "icc_profile", "xmp", "parameters", "comment"}.isdisjoint(out.info)


# Refused before decoding ---------------------------------------------------------------------


def test_decompression_bomb_png_is_refused_from_its_header(no_decoding: None) -> None:
    bomb = png_declaring(100_000, 100_000)  # 30 GB of RGB if it were ever decoded
    assert len(bomb) < 200
    assert rejected(lambda: check(bomb), "too many pixels") < 1.0
    # Pillow's own guard holds too when the deployment cap is set absurdly high.
    assert rejected(lambda: check(bomb, max_pixels=10**12), "too many pixels") < 1.0


def test_png_over_our_cap_is_refused_from_its_header(no_decoding: None) -> None:
    big = png_declaring(5000, 5000)  # below Pillow's guard, above ours
    assert rejected(lambda: check(big), r"5000x5000 pixels .* limit is 16777216") < 1.0


def test_pillow_bomb_warning_becomes_a_rejection(no_decoding: None) -> None:
    # Between MAX_IMAGE_PIXELS and twice that Pillow only warns; that must not leak out.
    side = int((Image.MAX_IMAGE_PIXELS or 0) ** 0.5) + 100
    big = png_declaring(side, side)
    assert rejected(lambda: check(big, max_pixels=10**12), "too many pixels") < 1.0


def test_oversized_upload_is_refused_before_opening(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> Image.Image:
        raise AssertionError("the file was opened")

    monkeypatch.setattr(Image, "open", refuse)
    data = b"\xff\xd8" + b"\0" * (MAX_BYTES + 1)
    message = r"^the image is too large: 20\.0 MB; the limit is 20\.0 MB$"
    assert rejected(lambda: check(data), message) < 1.0


def test_empty_file() -> None:
    rejected(lambda: check(b""), "^the image is empty$")
    empty_mask = lambda: validate_mask(b"", max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS)  # noqa: E731
    rejected(empty_mask, "^the mask is empty$")


@pytest.mark.parametrize(
    "data",
    [
        b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
        b'<rect width="10" height="10"/></svg>',
        b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>',
        encode(Image.new("RGB", (8, 8)), "GIF"),
        encode(Image.new("RGB", (8, 8)), "BMP"),
        encode(Image.new("RGB", (8, 8)), "TIFF"),
        b"not an image at all",
    ],
    ids=["svg", "svg-script", "gif", "bmp", "tiff", "text"],
)
def test_other_formats_are_refused(data: bytes) -> None:
    rejected(lambda: check(data), "^only PNG, JPEG or WebP images are accepted$")


def test_truncated_jpeg() -> None:
    jpeg = encode(noise(256, 256), "JPEG", quality=95)
    half = jpeg[: len(jpeg) // 2]
    with Image.open(BytesIO(half)) as img:  # the header alone still reads fine
        assert img.size == (256, 256)
    assert rejected(lambda: check(half), "^the image file is truncated or corrupt$") < 1.0


def test_compressed_text_chunk_bomb() -> None:
    info = PngInfo()
    info.add_text("Comment", "x" * 20 * MB, zip=True)  # 20 KB on disk, 20 MB inflated
    data = encode(Image.new("RGB", (8, 8)), "PNG", pnginfo=info)
    assert len(data) < 100_000
    assert rejected(lambda: check(data), "corrupt or carries too much metadata") < 1.0


def test_truncated_png() -> None:
    png = encode(noise(64, 64), "PNG")
    rejected(lambda: check(png[: len(png) // 2]), "truncated or corrupt")


def test_png_declaring_more_pixels_than_its_data_holds() -> None:
    rejected(lambda: check(png_declaring(2000, 2000)), "truncated or corrupt")


# Metadata ------------------------------------------------------------------------------------


def jpeg_with_padding(total_padding: int) -> bytes:
    """A small JPEG with GPS EXIF plus ``total_padding`` bytes of APP15 segments (64 KB each)."""
    jpeg = encode(noise(32, 32), "JPEG", exif=gps_exif())
    per_segment = 65533  # the segment length field (max 65535) counts its own two bytes
    segments = []
    remaining = total_padding
    while remaining > 0:
        size = min(per_segment, remaining)
        segments.append(b"\xff\xef" + struct.pack(">H", size + 2) + b"\xa5" * size)
        remaining -= size
    return jpeg[:2] + b"".join(segments) + jpeg[2:]


def png_with_big_text(size: int) -> bytes:
    """A small PNG with GPS EXIF plus one uncompressed tEXt chunk of ``size`` bytes."""
    info = PngInfo()
    info.add_text("Comment", "x" * size)
    return encode(noise(32, 32), "PNG", pnginfo=info, exif=gps_exif())


@pytest.mark.parametrize(
    ("make", "fmt"), [(jpeg_with_padding, "JPEG"), (png_with_big_text, "PNG")], ids=["jpeg", "png"]
)
def test_twenty_megabytes_of_metadata(make: Callable[[int], bytes], fmt: str) -> None:
    data = make(20 * MB)
    with Image.open(BytesIO(data)) as src:  # the input really carries GPS
        assert src.getexif().get_ifd(ExifTags.IFD.GPSInfo)
    assert rejected(lambda: check(data), "the limit is 20.0 MB") < 1.0

    start = time.perf_counter()
    result = check(data, max_bytes=64 * MB)
    assert time.perf_counter() - start < 1.0
    assert (result.width, result.height, result.original_format) == (32, 32, fmt)
    assert len(result.png) < 10_000
    assert_clean_png(result)


def test_gps_exif_stripped_from_jpeg() -> None:
    data = encode(noise(64, 48), "JPEG", exif=gps_exif())
    with Image.open(BytesIO(data)) as src:
        assert src.getexif().get_ifd(ExifTags.IFD.GPSInfo)
    result = check(data)
    assert_clean_png(result)
    assert b"PhoneCo" not in result.png


def test_png_metadata_stripped() -> None:
    info = PngInfo()
    info.add_text("parameters", "secret prompt")
    info.add_itxt("XML:com.adobe.xmp", "<x:xmpmeta>GPS</x:xmpmeta>")
    info.add_text("Comment", "x" * 2 * MB)
    data = encode(noise(40, 30), "PNG", pnginfo=info, exif=gps_exif(), icc_profile=b"\0" * 200)
    with Image.open(BytesIO(data)) as src:
        assert src.getexif().get_ifd(ExifTags.IFD.GPSInfo)
        assert "parameters" in src.info
    result = check(data)
    assert_clean_png(result)
    assert b"secret" not in result.png


# Accepted ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "kw", "exact"),
    [
        ("PNG", {}, True),
        ("JPEG", {"quality": 95}, False),
        ("WEBP", {"lossless": True}, True),
        ("WEBP", {"quality": 90}, False),
    ],
)
def test_valid_images_are_reencoded_as_png(fmt: str, kw: dict[str, Any], exact: bool) -> None:
    src = Image.linear_gradient("L").resize((64, 48)).convert("RGB")
    result = check(encode(src, fmt, **kw))
    assert (result.width, result.height, result.original_format) == (64, 48, fmt)
    assert_clean_png(result)
    out = decode_png_rgb(result.png)
    assert out.mode == "RGB" and out.size == (64, 48)
    if exact:
        assert out.tobytes() == src.tobytes()
    else:
        assert abs(out.getpixel((10, 40))[0] - src.getpixel((10, 40))[0]) <= 8  # type: ignore[index]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_exif_orientation_is_applied(fmt: str) -> None:
    src = Image.new("RGB", (40, 20), (255, 0, 0))
    src.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    result = check(encode(src, fmt, exif=gps_exif(orientation=6)))
    # Orientation 6: the camera was turned; upright the image is rotated 90 degrees clockwise,
    # so the left (red) half ends on top.
    assert (result.width, result.height) == (20, 40)
    out = decode_png_rgb(result.png)
    top, bottom = out.getpixel((10, 5)), out.getpixel((10, 35))
    assert isinstance(top, tuple) and isinstance(bottom, tuple)
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60
    assert_clean_png(result)


def test_transparency_is_flattened_onto_white() -> None:
    src = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    src.putpixel((1, 1), (10, 20, 30, 255))
    out = decode_png_rgb(check(encode(src, "PNG")).png)
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 1)) == (10, 20, 30)


def test_cmyk_and_grayscale_jpeg_become_rgb() -> None:
    for mode in ("CMYK", "L"):
        result = check(encode(Image.new(mode, (16, 16)), "JPEG"))
        assert decode_png_rgb(result.png).size == (16, 16)
        with Image.open(BytesIO(result.png)) as out:
            assert out.mode == "RGB"


# Masks -----------------------------------------------------------------------------------------


def mask(data: bytes) -> Image.Image:
    result = validate_mask(data, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS)
    assert_clean_png(result)
    with Image.open(BytesIO(result.png)) as out:
        assert out.mode == "L"
    return decode_png_mask(result.png)


def test_mask_painted_on_transparent_canvas() -> None:
    src = Image.new("RGBA", (8, 8), (255, 255, 255, 0))
    src.paste((255, 255, 255, 255), (0, 0, 4, 8))
    out = mask(encode(src, "PNG"))
    assert out.getpixel((1, 1)) == 255
    assert out.getpixel((6, 1)) == 0


def test_mask_from_rgb_and_16_bit_gray() -> None:
    src = Image.new("RGB", (8, 8), (0, 0, 0))
    src.paste((255, 255, 255), (4, 0, 8, 8))
    out = mask(encode(src, "JPEG", quality=100))
    assert out.getpixel((1, 1)) < 10 and out.getpixel((6, 1)) > 245  # type: ignore[operator]

    row = struct.pack("<8H", *([32768] * 4 + [65535] * 4))
    deep = Image.frombytes("I;16", (8, 8), row * 8)
    out = mask(encode(deep, "PNG"))
    assert out.getpixel((6, 1)) == 255
    assert out.getpixel((1, 1)) == 128


def test_mask_bomb_is_refused(no_decoding: None) -> None:
    bomb = png_declaring(100_000, 100_000)
    fn = lambda: validate_mask(bomb, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS)  # noqa: E731
    assert rejected(fn, "mask declares too many pixels") < 1.0


def test_decode_png_refuses_non_png() -> None:
    rejected(lambda: decode_png_rgb(encode(Image.new("RGB", (4, 4)), "JPEG")), "PNG")
    rejected(lambda: decode_png_rgb(png_declaring(100_000, 100_000)), "too many pixels")
