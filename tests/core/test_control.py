"""ControlNet units and their preprocessors on pictures whose edges and strokes are known."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw
from pydantic import ValidationError

from core.control import ControlUnit, canny, control_map, control_png, preprocessor_for, scribble
from core.errors import InvalidRequest
from core.images import validate_image


def _square(size: int = 64, box: tuple[int, int, int, int] = (16, 16, 48, 48)) -> Image.Image:
    img = Image.new("RGB", (size, size), "black")
    ImageDraw.Draw(img).rectangle(box, fill="white")
    return img


def _png(img: Image.Image) -> bytes:
    return validate_image(control_png(img), max_bytes=10**7, max_pixels=10**7).png


def test_canny_finds_a_squares_outline_and_nothing_else() -> None:
    edges = np.asarray(canny(_square()).convert("L")) > 0
    ys, xs = np.nonzero(edges)
    assert edges.sum() > 4 * 20  # most of the four sides
    # every edge pixel sits within two pixels of the square's border
    near = (np.minimum.reduce([abs(xs - 16), abs(xs - 48), abs(ys - 16), abs(ys - 48)]) <= 2)
    assert near.all()
    assert not edges[24:40, 24:40].any() and not edges[:8, :].any()  # inside, far outside
    # one-pixel-wide ridges, not the blur's band
    assert edges[32, 8:24].sum() <= 2


def test_canny_of_a_flat_picture_is_empty_and_thresholds_matter() -> None:
    assert not np.asarray(canny(Image.new("RGB", (40, 30), (90, 120, 30)))).any()
    faint = Image.new("RGB", (64, 64), (100, 100, 100))
    ImageDraw.Draw(faint).rectangle((16, 16, 48, 48), fill=(130, 130, 130))
    assert not np.asarray(canny(faint, low=100, high=200)).any()  # too faint for the defaults
    assert np.asarray(canny(faint, low=5, high=10)).any()


@pytest.mark.parametrize(("page", "ink"), [("white", "black"), ("black", "white")])
def test_scribble_keeps_the_strokes_on_either_page(page: str, ink: str) -> None:
    drawing = Image.new("RGB", (64, 64), page)
    ImageDraw.Draw(drawing).ellipse((12, 12, 52, 52), outline=ink, width=2)
    lines = np.asarray(scribble(drawing).convert("L")) > 0
    assert lines[12:14, 28:36].any() and lines[50:53, 28:36].any()  # top and bottom of the ring
    assert not lines[28:36, 28:36].any() and not lines[:6, :6].any()  # centre and corner empty


def test_control_map_fits_the_output_size_by_cropping() -> None:
    wide = Image.new("RGB", (200, 100), "black")
    ImageDraw.Draw(wide).rectangle((80, 30, 120, 70), fill="white")  # the middle square
    unit = ControlUnit(controlnet="canny-sd15", preprocessor="none", image=_png(wide))
    out = control_map(unit, 64, 64)
    assert out.size == (64, 64)
    arr = np.asarray(out.convert("L"))
    assert arr[32, 32] > 200 and arr[2, 2] < 50  # centred crop, square still in the middle
    edged = control_map(unit.model_copy(update={"preprocessor": "canny"}), 64, 64)
    assert np.asarray(edged).any() and np.asarray(edged.convert("L"))[32, 32] == 0


def test_units_name_what_is_wrong() -> None:
    png = _png(_square())
    with pytest.raises(ValidationError, match="end must be after its start"):
        ControlUnit(controlnet="c", image=png, start=0.6, end=0.4)
    with pytest.raises(ValidationError, match="below its low"):
        ControlUnit(controlnet="c", image=png, low=200, high=100)
    with pytest.raises(ValidationError, match="less than or equal to 2"):
        ControlUnit(controlnet="c", image=png, weight=3)
    a = ControlUnit(controlnet="c", image=png, weight=0.5)
    b = ControlUnit(controlnet="c", image=_png(Image.new("RGB", (8, 8))), weight=0.5)
    assert a.key() == b.key()  # different pictures, one pipeline call
    assert a.key() != ControlUnit(controlnet="c", image=png, weight=0.6).key()


def test_preprocessor_names_from_people_and_a1111() -> None:
    assert preprocessor_for("Canny") == "canny"
    assert preprocessor_for("scribble_xdog") == "scribble"
    with pytest.raises(InvalidRequest, match="unknown control preprocessor 'depth_midas'"):
        preprocessor_for("depth_midas")


def test_a_unit_travels_in_a_request_as_json() -> None:
    from core.request import GenerationRequest

    unit = ControlUnit(controlnet="c", preprocessor="scribble", image=_png(_square()), end=0.5)
    request = GenerationRequest(prompt="a castle", control=unit)
    back = GenerationRequest.model_validate_json(request.model_dump_json())
    assert back.control == unit and back == request
