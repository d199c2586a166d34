"""From chat to ``GenerationRequest``: prompt text + the person's defaults via ``core.flags``,
and the requests behind the result buttons (reroll, variation, upscale, another style)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from bots.common.prefs import SIZES, UserPrefs
from core.errors import InvalidRequest
from core.flags import (
    BASE_SIDE,
    MAX_ASPECT,
    ControlFlags,
    command_limit,
    fit_size,
    parse_flags,
    size_for_aspect,
)
from core.recipe import UPSCALE_STRENGTH, min_denoising_steps
from core.request import GenerationRequest, JobKind, build_request, check_text_length
from core.settings import Limits
from core.styles import StyleRegistry
from core.variations import variation as variation_of

# Bot-only flag (not a generation setting, so core.flags does not know it): send PNG files.
_ORIGINAL_RE = re.compile(r"(?<!\S)(?:--|[\u2014\u2013])(?:png|original)(?!\S)", re.IGNORECASE)
_SIZE_FLAG_RE = re.compile(
    r"(?<!\S)(?:--|[\u2014\u2013])(?:w|h|width|height|ar)(?=[\s=]|$)", re.IGNORECASE
)
UPSCALE_FACTOR = 2
IMG2IMG_MIN_SIDE = 256


@dataclass(frozen=True)
class Parsed:
    """A parsed prompt: the request, and whether the person asked for the original PNG."""

    request: GenerationRequest
    original: bool
    explicit_size: bool  # --w/--h/--ar given: an img2img keeps that size, not the photo's
    control: ControlFlags | None = None  # --control: the attached picture steers, not redrawn


def aspect_ratio(text: str) -> float:
    width, _, height = text.partition(":")
    return float(width) / float(height)


def defaults_for(prefs: UserPrefs) -> dict[str, Any]:
    """The person's settings as ``parse_command`` defaults."""
    defaults: dict[str, Any] = {"raw": prefs.raw}
    if prefs.size is not None or prefs.aspect != "1:1":
        # No size chosen and a square: the model's own default size (resolved at submit).
        # Another aspect without a size keeps a 512x512 area (the model is not known here).
        area_side = SIZES[prefs.size] if prefs.size is not None else SIZES["s"]
        width, height = size_for_aspect(aspect_ratio(prefs.aspect), area_side)
        defaults.update(width=width, height=height)
    if prefs.steps is not None:
        defaults["steps"] = prefs.steps
    if prefs.style:
        defaults["styles"] = (prefs.style,)
    return defaults


def parse_prompt(
    text: str, prefs: UserPrefs, registry: StyleRegistry | None = None,
    limits: Limits | None = None,
) -> Parsed:
    """``a cat --ar 16:9 --png`` -> the request; InvalidRequest naming what is wrong (first a
    text too long to read: ``core.flags.command_limit``)."""
    check_text_length(text, command_limit(limits or Limits()), what="the text")
    original = bool(_ORIGINAL_RE.search(text))
    stripped = _ORIGINAL_RE.sub(" ", text).strip()
    if not stripped:
        raise InvalidRequest("the prompt is empty; describe the image, e.g. 'a lighthouse at dusk'")
    request, control = parse_flags(
        stripped, defaults_for(prefs), registry=registry, limits=limits
    )
    return Parsed(
        request, original or prefs.original, bool(_SIZE_FLAG_RE.search(stripped)), control
    )


@dataclass(frozen=True)
class ModelSizes:
    """What a model draws: its default size (a request that gives none) and its largest."""

    default_width: int = BASE_SIDE
    default_height: int = BASE_SIDE
    max_width: int = 2 * BASE_SIDE
    max_height: int = 2 * BASE_SIDE


def img2img(
    parsed: Parsed, png: bytes, width: int, height: int, model: ModelSizes | None = None
) -> GenerationRequest:
    """Redraw an uploaded photo (already validated, PNG) in its shape, unless a size was given,
    at a size ``model`` (the model the request runs on) draws."""
    size = _photo_size(parsed, width, height, model)
    return _copy(parsed.request, kind=JobKind.img2img, init_image=png, **size)


def controlled(
    parsed: Parsed, png: bytes, width: int, height: int, model: ModelSizes | None = None
) -> GenerationRequest:
    """Draw anew, steered by an uploaded picture (already validated, PNG) as the ControlNet
    unit's: in the picture's shape unless a size was given, as ``img2img``."""
    if parsed.control is None:
        raise ValueError("controlled() needs a request parsed with --control")
    size = _photo_size(parsed, width, height, model)
    return _copy(parsed.request, control=parsed.control.unit(png), **size)


def _photo_size(
    parsed: Parsed, width: int, height: int, model: ModelSizes | None
) -> dict[str, int]:
    request = parsed.request
    sizes = model or ModelSizes()
    size: dict[str, int] = {}
    if not parsed.explicit_size:
        # The photo's shape, at its own pixel count: no larger than the person's default size
        # (no detail to gain by blowing a thumbnail up), no smaller than IMG2IMG_MIN_SIDE², and
        # within what the model draws.
        ratio = min(max(width / height, 1 / MAX_ASPECT), MAX_ASPECT)
        asked = ((request.width or sizes.default_width)  # None: not given
                 * (request.height or sizes.default_height))
        area = min(asked, max(width * height, IMG2IMG_MIN_SIDE**2))
        w, h = size_for_aspect(ratio, math.sqrt(area))
        size["width"], size["height"] = fit_size(w, h, sizes.max_width, sizes.max_height)
    return size


def reroll(request: GenerationRequest) -> GenerationRequest:
    """The same request with a new random seed."""
    return _copy(request, seed=None)


def restyle(request: GenerationRequest, style: str) -> GenerationRequest:
    """The same request and seed in one other style: easy to compare."""
    return _copy(request, styles=(style,))


def variation(
    request: GenerationRequest, png: bytes, width: int, height: int, style: str | None
) -> GenerationRequest:
    """New takes on one image of a job (``core.variations``), as many as the job made."""
    return variation_of(request, png, width, height, (style,) if style else ())


def upscaled_size(width: int, height: int, max_side: int) -> tuple[int, int] | None:
    """The size an upscale of a ``width`` x ``height`` image makes, or None when ``max_side``
    leaves no room to grow (then no U button is offered)."""
    factor = min(UPSCALE_FACTOR, max_side / max(width, height))
    new_width, new_height = (int(side * factor) // 8 * 8 for side in (width, height))
    if new_width <= width or new_height <= height:
        return None
    return new_width, new_height


def upscale(
    request: GenerationRequest,
    png: bytes,
    width: int,
    height: int,
    style: str | None,
    seed: int,
    *,
    max_side: int,
) -> GenerationRequest:
    """One image at up to twice its size, capped by ``max_side``."""
    size = upscaled_size(width, height, max_side)
    if size is None:
        raise InvalidRequest(
            f"this image is {width}x{height}; the largest side allowed is {max_side}, "
            "so it cannot be upscaled"
        )
    new_width, new_height = size
    return _copy(
        request,
        kind=JobKind.upscale,
        init_image=png,
        mask=None,
        width=new_width,
        height=new_height,
        styles=(style,) if style else (),
        count=1,
        seed=seed,
        # The engine repaints UPSCALE_STRENGTH of the steps: at least one must remain.
        # (A stored job's steps are resolved; one left to the model gets at least that.)
        steps=max(request.steps or 1, min_denoising_steps(UPSCALE_STRENGTH)),
    )


def _copy(request: GenerationRequest, **update: Any) -> GenerationRequest:
    """A validated copy (``model_copy`` would skip the validators)."""
    return build_request(**{**dict(request), **update})
