"""The cost model: pixels x steps x images, never below one credit."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.cost import job_cost, job_cost_for
from core.errors import ConfigError
from core.request import GenerationRequest, JobKind, ModelDefaults
from core.settings import Settings


def req(**kw: object) -> GenerationRequest:
    """Resolved against an SD1.5-like model (512x512, 20 steps): prices are of what runs."""
    return GenerationRequest(prompt="a cat", **kw).with_model_defaults(
        ModelDefaults(width=512, height=512, steps=20, guidance=7.0, scheduler="Euler a"))


@pytest.mark.parametrize(
    ("fields", "credits"),
    [
        ({}, 1),
        ({"steps": 30}, 1),
        ({"width": 256, "height": 256, "steps": 5}, 1),
        ({"width": 1024, "height": 1024}, 4),
        ({"count": 4}, 4),
        ({"steps": 60}, 2),
        ({"steps": 31}, 2),
        ({"width": 768, "height": 512}, 2),
        ({"count": 2, "styles": ("anime", "watercolor")}, 4),
        ({"width": 1024, "height": 1024, "steps": 45, "count": 2}, 12),
    ],
)
def test_job_cost_examples(fields: dict[str, object], credits: int) -> None:
    assert job_cost(req(**fields)) == credits


def test_upscale_costs_like_its_output_size() -> None:
    up = req(kind=JobKind.upscale, init_image=b"png", width=1024, height=1024)
    assert job_cost(up) == 4


def test_custom_bases_and_settings() -> None:
    assert job_cost(req(width=1024, height=1024), base_pixels=1024 * 1024) == 1
    assert job_cost(req(steps=20), base_steps=10) == 2
    s = Settings(cost_base_pixels=1024 * 1024, cost_base_steps=20, _env_file=None)
    assert job_cost_for(req(width=1024, height=1024, steps=40), s) == 2


def test_bad_bases_rejected() -> None:
    with pytest.raises(ConfigError, match="base_pixels must be positive, got 0"):
        job_cost(req(), base_pixels=0)
    with pytest.raises(ConfigError, match="base_steps must be positive, got -1"):
        job_cost(req(), base_steps=-1)


sides = st.integers(8, 256).map(lambda n: n * 8)


@settings(max_examples=150, deadline=None)
@given(
    w=sides, h=sides, steps=st.integers(1, 150), count=st.integers(1, 4),
    dw=st.integers(0, 64), dsteps=st.integers(0, 40), dcount=st.integers(0, 3),
)  # fmt: skip
def test_cost_is_monotone_and_never_zero(
    w: int, h: int, steps: int, count: int, dw: int, dsteps: int, dcount: int
) -> None:
    small = req(width=w, height=h, steps=steps, count=count)
    big = req(
        width=min(2048, w + 8 * dw),
        height=h,
        steps=min(150, steps + dsteps),
        count=min(4, count + dcount),
    )
    assert job_cost(small) >= 1
    assert job_cost(big) >= job_cost(small)
    assert job_cost(req(width=w, height=h, steps=steps, count=count, styles=("anime",))) == (
        job_cost(small)
    )
