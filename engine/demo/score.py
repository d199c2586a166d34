"""The adherence scorer (plain numpy): what a picture shows in terms of our scenes, and whether
that is what a caption asked for.

Each pixel takes the nearest named colour; the background is the commonest name along the
border; each other colour's largest connected patch is a shape, its holes filled (so a line-art
outline counts as the shape it encloses). Its kind comes from two numbers: solidity (area over
the convex hull's; a star's points leave it low) and how much of its bounding box it fills
(square ~1, circle ~0.79, triangle ~0.5). Positions are the patches' centroids.
``fill_ratio`` / ``outlined`` tell a filled shape from an outline (the demo LoRA's look).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
from PIL import Image

from engine.demo.scenes import COLOURS, Scene

_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[n] for n in _NAMES], dtype=np.float32)
MIN_AREA_FRACTION = 0.01  # smaller patches are specks, not shapes
ATTRIBUTES = ("background", "colour", "kind", "position")
# Not a goal, a diagnosis: whether the two shapes lie along the asked axis (side by side for
# left/right, one over the other for above/below), whichever way round they are. Position
# is this and the right order.
AXIS = "axis"


@dataclass(frozen=True)
class Found:
    colour: str
    kind: str
    x: float  # centroid, as a fraction of the width
    y: float
    area: float  # fraction of the picture


@dataclass(frozen=True)
class Reading:
    background: str
    shapes: tuple[Found, ...]  # largest first

    def shape(self, colour: str) -> Found | None:
        return next((s for s in self.shapes if s.colour == colour), None)


def colour_names(image: Image.Image | np.ndarray) -> np.ndarray:
    """Each pixel's nearest named colour, as an index into ``COLOURS``."""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image,
                     dtype=np.float32)
    distances = ((rgb[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(axis=-1)
    return np.asarray(distances.argmin(axis=-1))


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of ``mask``, each as a boolean mask."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    out = []
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        part = np.zeros_like(mask, dtype=bool)
        queue = deque([(y0, x0)])
        seen[y0, x0] = True
        while queue:
            y, x = queue.popleft()
            part[y, x] = True
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        out.append(part)
    return out


def _fill_holes(part: np.ndarray) -> np.ndarray:
    """``part`` with every pixel it encloses (not reachable from the border around it)."""
    outside = _components(np.pad(~part, 1, constant_values=True))
    border_touching = [c for c in outside if c[0].any() or c[-1].any() or c[:, 0].any()
                       or c[:, -1].any()]
    reachable = np.zeros_like(outside[0]) if outside else np.zeros((1, 1), bool)
    for c in border_touching:
        reachable |= c
    return ~reachable[1:-1, 1:-1] if outside else part


def _hull_area(mask: np.ndarray) -> float:
    """Area of the convex hull of the pixels' corners (monotone chain)."""
    ys, xs = np.nonzero(mask)
    corners = {(x + dx, y + dy) for x, y in zip(xs.tolist(), ys.tolist(), strict=True)
               for dx in (0, 1) for dy in (0, 1)}
    points = sorted(corners)
    if len(points) < 3:
        return float(len(points))

    def cross(o: tuple[int, int], a: tuple[int, int], b: tuple[int, int]) -> int:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list[tuple[int, int]] = []
    upper: list[tuple[int, int]] = []
    for p in points:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(points):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    hull = lower[:-1] + upper[:-1]
    area = 0.0
    for (x1, y1), (x2, y2) in zip(hull, hull[1:] + hull[:1], strict=True):
        area += x1 * y2 - x2 * y1
    return abs(area) / 2


def shape_kind(mask: np.ndarray) -> str:
    """circle, square, triangle or star, for a filled patch."""
    area = float(mask.sum())
    ys, xs = np.nonzero(mask)
    box = float((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    solidity = area / max(_hull_area(mask), 1.0)
    fill = area / box
    if solidity < 0.8:
        return "star"
    if fill > 0.88:
        return "square"
    if fill > 0.66:
        return "circle"
    return "triangle"


def read(image: Image.Image | np.ndarray) -> Reading:
    """The background and the shapes a picture shows."""
    names = colour_names(image)
    h, w = names.shape
    border = np.concatenate([names[0], names[-1], names[:, 0], names[:, -1]])
    background = int(np.bincount(border, minlength=len(_NAMES)).argmax())
    found = []
    for index in np.unique(names):
        if index == background:
            continue
        parts = _components(names == index)
        part = max(parts, key=lambda p: int(p.sum()))
        if part.sum() < MIN_AREA_FRACTION * h * w:
            continue
        filled = _fill_holes(part)
        ys, xs = np.nonzero(filled)
        found.append(Found(_NAMES[int(index)], shape_kind(filled), (xs.mean() + 0.5) / w,
                           (ys.mean() + 0.5) / h, float(filled.sum()) / (h * w)))
    found.sort(key=lambda f: -f.area)
    return Reading(_NAMES[background], tuple(found))


def score(image: Image.Image | np.ndarray, scene: Scene) -> dict[str, bool | None]:
    """Per attribute, whether the picture shows what ``scene`` asks for (None where the scene
    has no such attribute: position with one shape in the middle). ``colour``: every asked
    shape's colour is there; ``kind``: each of those patches has the asked kind;
    ``position``: the two centroids are in the asked relation (one shape: its centroid is on
    the asked side); ``axis``: they lie along the relation's axis (either order)."""
    reading = read(image)
    patches = [reading.shape(s.colour) for s in scene.shapes]
    kinds = [p is not None and p.kind == s.kind for p, s in zip(patches, scene.shapes,
                                                                strict=True)]
    position: bool | None = None
    axis: bool | None = None
    if scene.relation is not None:
        a, b = patches
        position = a is not None and b is not None and bool({
            "left": a.x < b.x, "right": a.x > b.x, "above": a.y < b.y, "below": a.y > b.y,
        }[scene.relation])
        axis = a is not None and b is not None and bool(
            (abs(a.x - b.x) > abs(a.y - b.y)) == (scene.relation in ("left", "right")))
    elif scene.side is not None:
        (a,) = patches
        position = a is not None and bool({
            "left": a.x < 0.5, "right": a.x > 0.5, "top": a.y < 0.5, "bottom": a.y > 0.5,
        }[scene.side])
    return {
        "background": bool(reading.background == scene.background),
        "colour": all(p is not None for p in patches),
        "kind": all(kinds),
        "position": position,
        AXIS: axis,
    }


def rendering_features(image: Image.Image | np.ndarray) -> dict[str, float]:
    """Numbers that tell the renderings apart: ``ring`` (the largest shape's drawn area over
    its filled area: low for an outline), ``blocky`` (changes inside aligned 2x2 blocks over
    changes inside blocks one pixel off: low for big square pixels), ``grain`` (median
    difference between neighbouring pixels: high for a grainy wash)."""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image,
                     dtype=np.float32)
    names = colour_names(rgb)
    reading_bg = int(np.bincount(np.concatenate([names[0], names[-1], names[:, 0],
                                                 names[:, -1]])).argmax())
    ring = 1.0
    parts = [p for i in np.unique(names) if i != reading_bg for p in _components(names == i)]
    if parts:
        part = max(parts, key=lambda p: int(p.sum()))
        ring = float(part.sum()) / max(float(_fill_holes(part).sum()), 1.0)

    def changes(block: np.ndarray) -> int:
        h, w = (block.shape[0] // 2) * 2, (block.shape[1] // 2) * 2
        b = block[:h, :w].reshape(h // 2, 2, w // 2, 2, 3)
        spread = b.max(axis=(1, 3)) - b.min(axis=(1, 3))
        return int((spread.max(axis=-1) > 24).sum())

    blocky = changes(rgb) / max(changes(rgb[1:, 1:]), 1)
    grain = float(np.median(np.abs(np.diff(rgb, axis=1)).max(axis=-1)))
    return {"ring": ring, "blocky": blocky, "grain": grain}


def rendering_of(image: Image.Image | np.ndarray) -> str:
    """plain, outline (line-art), soft (watercolor) or pixels (pixel-art), for a drawn scene."""
    f = rendering_features(image)
    if f["ring"] < 0.6:
        return "outline"
    if f["blocky"] < 0.3:
        return "pixels"
    if f["grain"] > 3:
        return "soft"
    return "plain"


# Filled or outline ---------------------------------------------------------------------------

# An outline's line (2.5 px at 64 px) runs along the edge of what it encloses: the inside, that
# area less a band this wide along its edge, is background for an outline and the shape's own
# colour for a filled shape. Pixels at 64 px: a larger picture scales them (its side / 64).
INSET = 3
OUTLINE_BELOW = 0.5  # of the inside in the shape's colour
SPECK = 4  # pixels: a patch of a shape's colour this small is noise, not part of its line


def _shift_all(mask: np.ndarray, grow: bool) -> np.ndarray:
    """``mask`` dilated (``grow``) or eroded by one pixel, 3x3 neighbourhood."""
    padded = np.pad(mask, 1, constant_values=not grow)
    h, w = mask.shape
    views = [padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)]
    return np.asarray(np.logical_or.reduce(views) if grow else np.logical_and.reduce(views))


def _enclosed(part: np.ndarray, gap: int = 1) -> np.ndarray:
    """What ``part`` covers or encloses, bridging breaks in its line up to ``2 * gap`` pixels
    wide (a generated outline is seldom closed all round): closing, then holes filled."""
    grown = part
    for _ in range(gap):
        grown = _shift_all(grown, grow=True)
    closed = _fill_holes(grown)
    for _ in range(gap):
        closed = _shift_all(closed, grow=False)
    return np.asarray(closed | _fill_holes(part))


def fill_ratio(image: Image.Image | np.ndarray, scene: Scene) -> float | None:
    """How much of each asked shape's inside is its colour (the area its pixels cover or
    enclose, less an ``INSET`` band along the edge), the mean over the shapes whose inside
    is big enough to tell: ~1 for filled shapes, under ``OUTLINE_BELOW`` for outlines; None
    when no asked shape is there to tell (missing, or too small: a little star's inside)."""
    names = colour_names(image)
    h, w = names.shape
    unit = min(h, w) / 64  # the pixel sizes below are at 64 px (the line is 2.5 of them)
    speck, inset, gap = SPECK * unit * unit, round(INSET * unit), max(1, round(unit))
    ratios = []
    for shape in scene.shapes:
        parts = [p for p in _components(names == _NAMES.index(shape.colour)) if p.sum() >= speck]
        if not parts:
            continue
        drawn = np.logical_or.reduce(parts)
        if drawn.sum() < MIN_AREA_FRACTION * h * w:
            continue
        inside = _enclosed(drawn, gap)
        for _ in range(inset):
            inside = _shift_all(inside, grow=False)
        if inside.sum() < speck:
            continue
        ratios.append(float((drawn & inside).sum()) / float(inside.sum()))
    return sum(ratios) / len(ratios) if ratios else None


def outlined(image: Image.Image | np.ndarray, scene: Scene) -> bool | None:
    """Whether the asked shapes are drawn as outlines (None: none of them is there to tell)."""
    ratio = fill_ratio(image, scene)
    return None if ratio is None else ratio < OUTLINE_BELOW
