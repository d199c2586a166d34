"""Variations, written once (``core.variations``) for the chat's V buttons and the gallery."""

from __future__ import annotations

import pytest

from core.errors import InvalidRequest
from core.request import GenerationRequest, JobKind
from core.variations import VARIATION_STRENGTH, variation

PNG = b"\x89PNG not decoded here"


def _job(**fields: object) -> GenerationRequest:
    base: dict[str, object] = {
        "prompt": "a lighthouse at dusk", "model": "tiny", "width": 64, "height": 64,
        "steps": 2, "seed": 1234, "count": 4, "styles": ("anime", "watercolor"),
    }
    return GenerationRequest(**(base | fields))  # type: ignore[arg-type]


def test_a_variation_repaints_the_image_with_the_job_s_prompt_at_a_new_seed() -> None:
    job = _job(negative="blurry", guidance=6.0)
    made = variation(job, PNG, 96, 128, ("watercolor",))
    assert made.kind is JobKind.variation and made.init_image == PNG and made.mask is None
    assert (made.width, made.height, made.styles) == (96, 128, ("watercolor",))
    assert made.strength == VARIATION_STRENGTH and made.seed is None
    # Everything else is the job's own.
    assert (made.prompt, made.negative, made.guidance, made.steps, made.model) == (
        job.prompt, job.negative, job.guidance, job.steps, job.model
    )
    assert made.count == 4  # as many as the job made (the chat's V buttons)
    assert variation(job, PNG, 96, 128, ()).styles == ()


def test_count_one_for_the_gallery() -> None:
    assert variation(_job(), PNG, 64, 64, ("anime",), count=1).count == 1


def test_the_copy_is_validated() -> None:
    with pytest.raises(InvalidRequest, match="width"):
        variation(_job(), PNG, 100, 64, ())
