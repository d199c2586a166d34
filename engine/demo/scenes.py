"""Captioned training scenes for the demo model: one or two flat shapes (circle, square,
triangle, star) in named colours on a coloured background, placed left/right or above/below,
drawn plain or in one of three renderings our style names map to (``line-art``: outlines,
``watercolor``: soft blurred edges and paper grain, ``pixel-art``: big square pixels).

Everything is seeded (``random.Random``), so a scene list is reproducible from its seed; the
same ``Scene`` gives its caption, its picture and what the scorer should find.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Named colours far apart in RGB, so the nearest name of a drawn (or generated) pixel is clear.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 215),
    "yellow": (240, 215, 50),
    "purple": (140, 55, 175),
    "orange": (245, 135, 25),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
# Where the first shape is, relative to the second: the words of the caption.
RELATIONS: dict[str, str] = {
    "left": "to the left of",
    "right": "to the right of",
    "above": "above",
    "below": "below",
}
# Where a lone shape is, when the caption says (otherwise near the middle): the caption's words.
SIDES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
# Renderings a style name maps to; any other style (or none) draws plain.
RENDERINGS: dict[str, str] = {"line-art": "outline", "watercolor": "soft", "pixel-art": "pixels"}


@dataclass(frozen=True)
class Shape:
    colour: str
    kind: str


@dataclass(frozen=True)
class Scene:
    """``shapes[0]`` is ``relation`` of ``shapes[1]`` when there are two (``relation`` None
    for one shape, drawn at ``side`` of the picture, or near the middle when that is None)."""

    background: str
    shapes: tuple[Shape, ...]
    relation: str | None = None
    side: str | None = None

    @property
    def caption(self) -> str:
        first = f"a {self.shapes[0].colour} {self.shapes[0].kind}"
        if self.side is not None:
            return f"{first} {SIDES[self.side]} on a {self.background} background"
        if self.relation is None:
            return f"{first} on a {self.background} background"
        second = f"a {self.shapes[1].colour} {self.shapes[1].kind}"
        return f"{first} {RELATIONS[self.relation]} {second} on a {self.background} background"


def random_scene(rng: random.Random, two_shapes: float = 0.5, sided: float = 0.0) -> Scene:
    """A scene whose colours are all different (so the scorer can tell the shapes apart);
    ``sided``: the share of one-shape scenes placed at a side their caption names."""
    names = rng.sample(list(COLOURS), 3)
    if rng.random() < two_shapes:
        shapes = (Shape(names[1], rng.choice(SHAPES)), Shape(names[2], rng.choice(SHAPES)))
        return Scene(names[0], shapes, rng.choice(list(RELATIONS)))
    shape = Shape(names[1], rng.choice(SHAPES))
    if sided and rng.random() < sided:
        return Scene(names[0], (shape,), side=rng.choice(list(SIDES)))
    return Scene(names[0], (shape,))


def parse_caption(text: str) -> Scene | None:
    """The scene a prompt describes (anywhere in the text, so a styled prompt parses too), in
    the captions' grammar or any phrasing of ``engine.demo.phrasing``, or None when it
    describes none of ours."""
    from engine.demo.phrasing import parse  # it builds on this module's names

    return parse(text)


# Drawing ----------------------------------------------------------------------------------


def _outline(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if kind == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if kind == "triangle":  # pointing up, base at the bottom
        return [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
    if kind == "star":
        points = []
        for i in range(10):
            radius = r if i % 2 == 0 else r * 0.42
            angle = -math.pi / 2 + i * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    steps = 48  # circle
    return [(cx + r * math.cos(2 * math.pi * i / steps), cy + r * math.sin(2 * math.pi * i / steps))
            for i in range(steps)]


def _placements(scene: Scene, size: int, rng: random.Random) -> list[tuple[float, float, float]]:
    """(centre x, centre y, radius) of each shape, in pixels."""
    u = size / 64
    if scene.side is not None:  # as the first of two shapes would be, a little larger
        r, near, across = rng.uniform(10, 13) * u, rng.uniform(16, 20) * u, rng.uniform(22, 42) * u
        return [{"left": (near, across, r), "right": (size - near, across, r),
                 "top": (across, near, r), "bottom": (across, size - near, r)}[scene.side]]
    if scene.relation is None:
        r = rng.uniform(11, 17) * u
        return [(size / 2 + rng.uniform(-6, 6) * u, size / 2 + rng.uniform(-6, 6) * u, r)]
    r1, r2 = rng.uniform(8, 11) * u, rng.uniform(8, 11) * u
    near, far = rng.uniform(15, 20) * u, rng.uniform(44, 49) * u
    across1, across2 = rng.uniform(20, 44) * u, rng.uniform(20, 44) * u
    first, second = {
        "left": ((near, across1), (far, across2)),
        "right": ((far, across1), (near, across2)),
        "above": ((across1, near), (across2, far)),
        "below": ((across1, far), (across2, near)),
    }[scene.relation]
    return [(*first, r1), (*second, r2)]


def render(scene: Scene, size: int = 64, style: str | None = None, seed: int = 0) -> Image.Image:
    """The scene drawn at ``size`` x ``size``, in the rendering ``style`` maps to."""
    rng = random.Random(seed)
    rendering = RENDERINGS.get(style or "", "plain")
    scale = 4  # drawn large and downsampled: smooth edges
    canvas = Image.new("RGB", (size * scale, size * scale), COLOURS[scene.background])
    draw = ImageDraw.Draw(canvas)
    for shape, (cx, cy, r) in zip(scene.shapes, _placements(scene, size, rng), strict=True):
        points = [(x * scale, y * scale) for x, y in _outline(shape.kind, cx, cy, r)]
        colour = COLOURS[shape.colour]
        if rendering == "outline":
            draw.line([*points, points[0]], fill=colour, width=int(2.5 * scale * size / 64),
                      joint="curve")
        else:
            draw.polygon(points, fill=colour)
    image = canvas.resize((size, size), Image.Resampling.LANCZOS)
    if rendering == "soft":
        image = image.filter(ImageFilter.GaussianBlur(radius=1.2 * size / 64))
        grain = np.random.default_rng(seed).normal(0, 9, (size, size, 1))
        image = Image.fromarray(np.clip(np.asarray(image, np.float32) + grain, 0, 255)
                                .astype(np.uint8))
    elif rendering == "pixels":
        cells = max(1, min(32, size // 2))  # 32 cells across at any size from 64 up
        image = image.resize((cells, cells), Image.Resampling.BOX).resize(
            (size, size), Image.Resampling.NEAREST)
    return image
