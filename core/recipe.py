"""The request recipe: which pipeline a request runs on, with which strength, steps and seeds,
and which requests may share one pipeline call. Pure functions of a ``GenerationRequest``, so the
client (refusing what cannot run), the dispatcher (batching) and the engine (running) agree
without front ends importing the Diffusers engine."""

from __future__ import annotations

import math

from core.errors import InvalidRequest
from core.request import MAX_SEED, GenerationRequest, JobKind

# An upscale is a light img2img pass over the Lanczos-enlarged image: enough to add detail,
# too little to change the picture. The request's own strength is for img2img/variations.
UPSCALE_STRENGTH = 0.3
# A variation without an image re-runs the prompt from seed + 4 onwards: the original job's
# images used seed .. seed + count - 1 (count <= 4), so none of them comes back as a "variation".
VARIATION_SEED_OFFSET = 4
# The fields of ``batch_key``, in order (named in the engine's error for a mixed batch).
KEY_FIELDS = (
    "model", "kind", "width", "height", "steps", "scheduler", "guidance", "strength", "adapters",
    "control",
)


def pipeline_kind(request: GenerationRequest) -> JobKind:
    """The pipeline a request runs on: txt2img, img2img or inpaint.

    Upscales and variations with an image are img2img; a variation without one is txt2img.
    """
    if request.kind is JobKind.inpaint:
        return JobKind.inpaint
    if request.kind is JobKind.txt2img or request.init_image is None:
        return JobKind.txt2img
    return JobKind.img2img


def effective_strength(request: GenerationRequest) -> float | None:
    """How much of an input image is repainted; None when there is no input image."""
    if pipeline_kind(request) is JobKind.txt2img:
        return None
    return UPSCALE_STRENGTH if request.kind is JobKind.upscale else request.strength


def batch_key(request: GenerationRequest) -> tuple[object, ...]:
    """Jobs with equal keys may share one pipeline call (fields named by ``KEY_FIELDS``).

    The kind is the pipeline kind, so a txt2img job and a variation without an image batch
    together; strength is part of the key only where an input image is denoised. A pipeline
    call runs one set of LoRAs at one set of weights, so the adapters (in name order) are too,
    and one ControlNet (its name, weight and interval).
    """
    r = request
    kind, strength = pipeline_kind(r).value, effective_strength(r)
    adapters = tuple(sorted((a.name, a.weight) for a in r.adapters))
    # One ControlNet at one weight and interval per call; the pictures may differ per job.
    control = r.control.key() if r.control is not None else None
    return (
        r.model, kind, r.width, r.height, r.steps, r.scheduler, r.guidance, strength, adapters,
        control,
    )


def item_pixels(request: GenerationRequest) -> int:
    """Pixels a job adds to a batch (for ``DeviceProfile.max_batch_pixels`` placement)."""
    width, height, _ = request.size_and_steps()
    return width * height * request.images_out


def min_denoising_steps(strength: float) -> int:
    """The fewest steps that leave an input image at least one denoising step: Diffusers runs
    only int(steps * strength) of them and refuses zero (2 steps at an upscale's 0.3, or any
    turbo model's 1-4 steps at a low strength). This is the one place that rule lives."""
    if not 0 < strength <= 1:
        raise InvalidRequest(f"strength must be in (0, 1], got {strength}")
    steps = max(1, math.ceil(1 / strength))
    # 1 / strength is rounded: step to the exact smallest count under Diffusers' int().
    while steps > 1 and int((steps - 1) * strength) >= 1:
        steps -= 1
    while int(steps * strength) < 1:
        steps += 1
    return steps


def pipeline_steps(request: GenerationRequest) -> int:
    """``num_inference_steps`` for the pipeline: the request's steps, raised where needed so an
    input image gets at least one denoising step (as A1111 does)."""
    steps, strength = request.size_and_steps()[2], effective_strength(request)
    if strength is None:
        return steps
    return max(steps, min_denoising_steps(strength))


def image_seeds(request: GenerationRequest) -> list[int]:
    """The seed of each of a job's ``count`` images: consecutive from the (resolved) seed."""
    if request.seed is None:
        raise InvalidRequest("the seed must be resolved before generating, got None")
    base = request.seed
    if request.kind is JobKind.variation and request.init_image is None:
        base += VARIATION_SEED_OFFSET
    return [(base + i) % (MAX_SEED + 1) for i in range(request.count)]
