"""The cost model: credits for a job grow with pixels x steps x images (512², <= 30 steps = 1)."""

from __future__ import annotations

import math
from fractions import Fraction

from core.errors import ConfigError
from core.request import GenerationRequest
from core.settings import Settings

BASE_PIXELS = 512 * 512
BASE_STEPS = 30


def job_cost(
    request: GenerationRequest, *, base_pixels: int = BASE_PIXELS, base_steps: int = BASE_STEPS
) -> int:
    """Credits for ``request``: ceil(images x max(1, pixels/base) x max(1, steps/base)), >= 1.

    Images are ``request.images_out`` (count for each style). Smaller or shorter jobs are not
    discounted below one image's price. For every kind, upscale included, width and height are
    the output size, which is what the GPU pays for.
    """
    if base_pixels <= 0:
        raise ConfigError(f"base_pixels must be positive, got {base_pixels}")
    if base_steps <= 0:
        raise ConfigError(f"base_steps must be positive, got {base_steps}")
    # Fractions, not floats: 1.0000000001 would round a 1-credit job up to 2.
    # Resolved first: the model's defaults are priced like given values.
    width, height, steps = request.size_and_steps()
    size = max(Fraction(1), Fraction(width * height, base_pixels))
    length = max(Fraction(1), Fraction(steps, base_steps))
    return max(1, math.ceil(request.images_out * size * length))


def job_cost_for(request: GenerationRequest, settings: Settings) -> int:
    """``job_cost`` with the deployment's base size and steps."""
    return job_cost(
        request, base_pixels=settings.cost_base_pixels, base_steps=settings.cost_base_steps
    )
