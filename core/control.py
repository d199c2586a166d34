"""ControlNet units and their preprocessors, which need no downloaded weights: Canny edges from a
photo, lines from a drawing (scribble), or the picture used as the control map as it is.

Pure numpy + Pillow; CPU-heavy on a phone photo, so front ends run ``control_map`` through
``core.offload`` (off the event loop), as they do image validation.
"""

from __future__ import annotations

from io import BytesIO
from typing import Literal

import numpy as np
from PIL import Image, ImageFilter, ImageOps
from pydantic import BaseModel, ConfigDict, Field, model_validator

from core.errors import InvalidRequest
from core.images import decode_png_rgb

Preprocessor = Literal["canny", "scribble", "none"]
PREPROCESSORS: tuple[Preprocessor, ...] = ("canny", "scribble", "none")
# A1111's ControlNet extension names the same preprocessors (its "module"); what we take of it.
A1111_MODULES: dict[str, Preprocessor] = {
    "canny": "canny", "scribble": "scribble", "scribble_xdog": "scribble",
    "scribble_hed": "scribble", "invert": "scribble", "none": "none",
}
MAX_WEIGHT = 2.0
# Hysteresis grows strong edges into weak ones one pixel per round: a bound keeps a hostile
# picture (a long weak edge snaking across a large image) from costing more than this.
MAX_HYSTERESIS_ROUNDS = 256


class ControlUnit(BaseModel):
    """One ControlNet unit of a request: which ControlNet, how its map is made, how strongly and
    over which part of the denoising it steers. ``image`` is a PNG from ``validate_image``."""

    # Frozen (part of a batch key); its picture travels as base64 in JSON, as the request's do.
    model_config = ConfigDict(
        frozen=True, extra="forbid", ser_json_bytes="base64", val_json_bytes="base64"
    )

    # None: the catalogue's ControlNet for this preprocessor and the request's model family.
    controlnet: str | None = Field(default=None, min_length=1, max_length=64)
    # None: the ControlNet's own (its catalogue entry), else the picture as it is.
    preprocessor: Preprocessor | None = None
    weight: float = Field(default=1.0, ge=0.0, le=MAX_WEIGHT)
    start: float = Field(default=0.0, ge=0.0, le=1.0)
    end: float = Field(default=1.0, ge=0.0, le=1.0)
    low: int = Field(default=100, ge=1, le=255)  # Canny thresholds, as A1111's extension
    high: int = Field(default=200, ge=1, le=255)
    image: bytes = Field(repr=False)

    @model_validator(mode="after")
    def _ranges(self) -> ControlUnit:
        if self.controlnet is None and self.preprocessor is None:
            raise ValueError("a control unit names a ControlNet or a preprocessor (canny, ...)")
        if self.end <= self.start:
            raise ValueError(
                f"control end must be after its start, got start {self.start} and end {self.end}"
            )
        if self.high < self.low:
            raise ValueError(f"canny high threshold {self.high} is below its low {self.low}")
        return self

    def infotext(self) -> str:
        """The unit as A1111's ControlNet extension writes it into an image's parameters."""
        from core.infotext import format_number

        fields = [
            ("Module", self.preprocessor or "none"), ("Model", self.controlnet or "none"),
            ("Weight", format_number(self.weight)), ("Resize Mode", "Crop and Resize"),
        ]
        if self.preprocessor == "canny":
            fields += [("Threshold A", str(self.low)), ("Threshold B", str(self.high))]
        fields += [("Guidance Start", format_number(self.start)),
                   ("Guidance End", format_number(self.end))]
        return ", ".join(f"{k}: {v}" for k, v in fields)

    def key(self) -> tuple[object, ...]:
        """What a pipeline call shares: one ControlNet at one weight over one interval."""
        return (self.controlnet, self.weight, self.start, self.end)


def preprocessor_for(name: str) -> Preprocessor:
    """Our preprocessor for a name a person or A1111's extension gives; InvalidRequest naming it."""
    key = name.strip().lower()
    if key in A1111_MODULES:
        return A1111_MODULES[key]
    raise InvalidRequest(
        f"unknown control preprocessor {name!r}; use one of {', '.join(PREPROCESSORS)}"
    )


def control_map(unit: ControlUnit, width: int, height: int) -> Image.Image:
    """The RGB control image for a ``width`` x ``height`` output: the unit's picture fitted to
    that size (cropped to its aspect, as A1111's "crop and resize"), then preprocessed."""
    source = ImageOps.fit(decode_png_rgb(unit.image), (width, height), Image.Resampling.LANCZOS)
    if unit.preprocessor == "canny":
        return canny(source, low=unit.low, high=unit.high)
    if unit.preprocessor == "scribble":
        return scribble(source)
    return source


def canny(image: Image.Image, *, low: int = 100, high: int = 200) -> Image.Image:
    """Canny edges, white on black: Gaussian blur, Sobel gradients, thinning to the ridge of
    each edge (non-maximum suppression), then the weak edges joined to a strong one."""
    gray = np.asarray(
        image.convert("L").filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float32
    )
    gx, gy = _sobel(gray)
    magnitude = np.hypot(gx, gy)
    # Thresholds on the scale of OpenCV's Canny (3x3 Sobel sums), which A1111's extension uses.
    thin = _suppress(magnitude, gx, gy)
    strong = thin >= high
    weak = thin >= low
    edges = _hysteresis(strong, weak)
    return Image.fromarray(np.where(edges, 255, 0).astype(np.uint8)).convert("RGB")


def scribble(image: Image.Image, *, threshold: int = 128) -> Image.Image:
    """Lines from a drawing, white on black: dark strokes on a light page (a sketch, a photo of
    one) or light strokes on a dark one, whichever the picture is."""
    gray = np.asarray(image.convert("L"), dtype=np.uint8)
    lines = gray < threshold if float(gray.mean()) >= threshold else gray >= threshold
    mask = Image.fromarray(np.where(lines, 255, 0).astype(np.uint8))
    # Thin pen lines survive a resize to the model's size as one-pixel crumbs: thicken once.
    return mask.filter(ImageFilter.MaxFilter(3)).convert("RGB")


def control_png(image: Image.Image) -> bytes:
    """A control map as a PNG, for the preview people see before (or with) their result."""
    out = BytesIO()
    image.save(out, format="PNG", compress_level=1)
    return out.getvalue()


def _sobel(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.pad(gray, 1, mode="edge")
    gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    return gx, gy


def _suppress(mag: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Keep a pixel only where it is the largest along its gradient (four directions)."""
    angle = (np.degrees(np.arctan2(gy, gx)) + 180.0) % 180.0
    p = np.pad(mag, 1)
    h, w = mag.shape
    neighbours = {  # (one side, the other) for each quantised direction
        0: (p[1:h + 1, 2:], p[1:h + 1, :w]),
        45: (p[:h, 2:], p[2:, :w]),
        90: (p[:h, 1:w + 1], p[2:, 1:w + 1]),
        135: (p[:h, :w], p[2:, 2:]),
    }
    sector = ((angle + 22.5) // 45).astype(int) % 4 * 45
    keep = np.zeros_like(mag, dtype=bool)
    for direction, (a, b) in neighbours.items():
        here = sector == direction
        keep |= here & (mag >= a) & (mag >= b)
    return np.where(keep, mag, 0.0)


def _hysteresis(strong: np.ndarray, weak: np.ndarray) -> np.ndarray:
    edges = strong.copy()
    for _ in range(MAX_HYSTERESIS_ROUNDS):
        p = np.pad(edges, 1)
        h, w = edges.shape
        grown = np.zeros_like(edges)
        for dy in range(3):
            for dx in range(3):
                grown |= p[dy:dy + h, dx:dx + w]
        grown &= weak
        if np.array_equal(grown, edges):
            break
        edges = grown
    return edges
