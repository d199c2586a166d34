"""The request recipe (core/recipe.py): pipeline kind, strength, batch key, pixels, steps, seeds."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.errors import InvalidRequest
from core.recipe import (
    UPSCALE_STRENGTH,
    VARIATION_SEED_OFFSET,
    batch_key,
    effective_strength,
    image_seeds,
    item_pixels,
    min_denoising_steps,
    pipeline_kind,
    pipeline_steps,
)
from core.request import MAX_SEED, GenerationRequest, JobKind

SIZE = 64


def request(**fields: object) -> GenerationRequest:
    base: dict[str, object] = {
        "prompt": "a lighthouse at dusk", "model": "tiny", "width": SIZE, "height": SIZE,
        "steps": 2, "seed": 1234,
    }
    return GenerationRequest(**(base | fields))  # type: ignore[arg-type]


def test_pipeline_kind_and_strength() -> None:
    assert pipeline_kind(request()) is JobKind.txt2img and effective_strength(request()) is None
    # A variation without an image re-runs the prompt; with one it repaints the image.
    assert pipeline_kind(request(kind="variation")) is JobKind.txt2img
    varied = request(kind="variation", init_image=b"png", strength=0.6)
    assert pipeline_kind(varied) is JobKind.img2img and effective_strength(varied) == 0.6
    upscale = request(kind="upscale", init_image=b"png", strength=0.9)
    assert pipeline_kind(upscale) is JobKind.img2img
    assert effective_strength(upscale) == UPSCALE_STRENGTH  # not the request's own
    inpaint = request(kind="inpaint", init_image=b"png", mask=b"m")
    assert pipeline_kind(inpaint) is JobKind.inpaint


def test_batch_key_and_pixels() -> None:
    t2i = request()
    assert batch_key(t2i) == batch_key(request(prompt="other", seed=9, count=3))
    # A variation without an image runs on the txt2img pipeline, so it batches with txt2img.
    assert batch_key(request(kind="variation")) == batch_key(t2i)
    assert batch_key(request(scheduler="DDIM")) != batch_key(t2i)
    img = request(kind="img2img", init_image=b"png")
    assert batch_key(img) != batch_key(request(kind="img2img", init_image=b"x", strength=0.5))
    assert item_pixels(request(count=2, styles=("anime", "sketch"))) == 4 * SIZE * SIZE


def test_an_input_image_always_gets_a_denoising_step() -> None:
    upscale = request(kind="upscale", init_image=b"png", width=128, height=128)
    assert min_denoising_steps(UPSCALE_STRENGTH) == 4  # int(3 x 0.3) would be 0
    assert pipeline_steps(upscale) == 4 and pipeline_steps(request()) == 2
    assert pipeline_steps(request(kind="img2img", init_image=b"png", steps=30)) == 30
    assert min_denoising_steps(1.0) == 1 and min_denoising_steps(0.5) == 2
    with pytest.raises(InvalidRequest, match="strength must be in"):
        min_denoising_steps(0.0)


@given(st.floats(min_value=0.01, max_value=1.0))
def test_min_denoising_steps_is_the_exact_least(strength: float) -> None:
    # Exactly what Diffusers computes (int(steps x strength)), not what 1/strength suggests.
    steps = min_denoising_steps(strength)
    assert int(steps * strength) >= 1
    assert steps == 1 or int((steps - 1) * strength) < 1


def test_image_seeds() -> None:
    assert image_seeds(request(seed=7, count=3)) == [7, 8, 9]
    assert image_seeds(request(seed=MAX_SEED, count=2)) == [MAX_SEED, 0]  # wraps
    assert image_seeds(request(kind="variation", seed=7, count=2)) == [
        7 + VARIATION_SEED_OFFSET, 8 + VARIATION_SEED_OFFSET
    ]
    with pytest.raises(InvalidRequest, match="seed must be resolved"):
        image_seeds(request(seed=None))
