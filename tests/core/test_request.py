"""GenerationRequest: validation errors name the bad value; limits; JSON round trip."""

import pytest

from core.cost import job_cost
from core.errors import InvalidRequest, PromptTooLong
from core.request import (
    GenerationRequest,
    JobKind,
    ModelDefaults,
    Params,
    build_request,
    check_text_length,
)
from core.settings import Limits


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"prompt": "  "}, "prompt"),
        ({"prompt": "x", "width": 500}, "width: must be a multiple of 8, got 500"),
        ({"prompt": "x", "count": 5}, "count: must be between 1 and 4, got 5"),
        ({"prompt": "x", "styles": ["a", "b", "c", "d", "e"]}, "at most 4 styles"),
        ({"prompt": "x", "scheduler": "Heun++"}, "unknown scheduler 'Heun++'"),
        ({"prompt": "x", "seed": -3}, "seed"),
        ({"prompt": "x", "kind": "img2img"}, "needs an init image"),
        ({"prompt": "x", "kind": "inpaint", "init_image": b"x"}, "needs a mask"),
    ],
)
def test_errors_name_the_value(fields: dict[str, object], needle: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        build_request(**fields)
    assert needle in err.value.message


def test_limits() -> None:
    req = build_request(prompt="x", width=1024, height=512, steps=50)
    req.check_limits(Limits())
    with pytest.raises(InvalidRequest, match="width must be between 64 and 768, got 1024"):
        req.check_limits(Limits(), max_side=768)
    with pytest.raises(InvalidRequest, match="steps must be at most 40"):
        req.check_limits(Limits(max_steps=40))


def test_json_round_trip_with_images() -> None:
    req = build_request(prompt="a fox", kind=JobKind.inpaint, init_image=b"\x89PNG\x00\xff",
                        mask=b"\x00\x01", styles="Anime, watercolor", seed=7)
    again = GenerationRequest.model_validate_json(req.model_dump_json())
    assert again == req and again.styles == ("anime", "watercolor")
    assert req.images_out == 2


def test_with_seed() -> None:
    req = build_request(prompt="x")
    assert req.seed is None
    fixed = req.with_seed()
    assert fixed.seed is not None and fixed.with_seed() is fixed
    assert req.with_seed(5).seed == 5


# Model defaults --------------------------------------------------------------------------------

TINY = ModelDefaults(width=64, height=64, steps=4, guidance=7.5, scheduler="Euler")


def test_what_the_person_leaves_out_is_none_until_resolved() -> None:
    req = build_request(prompt="a fox")
    assert (req.width, req.height, req.steps, req.guidance, req.scheduler) == (None,) * 5
    assert req.unresolved == ("width", "height", "steps", "guidance", "scheduler")
    with pytest.raises(InvalidRequest, match="width, height, steps, guidance, scheduler not set"):
        req.params()
    with pytest.raises(InvalidRequest, match="not set"):
        job_cost(req)  # nothing is priced before the model's defaults apply


def test_the_model_s_defaults_fill_only_what_was_not_given() -> None:
    plain = build_request(prompt="a fox").with_model_defaults(TINY)
    assert plain.params() == Params(64, 64, 4, 7.5, "Euler")
    given = build_request(prompt="a fox", width=128, steps=9, scheduler="ddim")
    resolved = given.with_model_defaults(TINY)
    assert resolved.params() == Params(128, 64, 9, 7.5, "DDIM")
    assert resolved.with_model_defaults(ModelDefaults(512, 512, 30, 1.0, "UniPC")) is resolved
    # The price is the resolved job's: the model's 64x64 x 4 steps, not the old 512x512 x 20.
    big = ModelDefaults(width=1024, height=1024, steps=60, guidance=6.0, scheduler="Euler a")
    assert job_cost(build_request(prompt="a fox").with_model_defaults(big)) == 8
    assert job_cost(plain) == 1
    # A stored (JSON) request keeps "not given" apart from a given value.
    again = GenerationRequest.model_validate_json(given.model_dump_json())
    assert again.height is None and again.width == 128


def test_texts_longer_than_the_limit_name_the_limit_and_the_length() -> None:
    limits = Limits(max_prompt_chars=50)
    GenerationRequest(prompt="p" * 50, negative="n" * 50, width=64, height=64,
                      steps=2).check_limits(limits)
    long_negative = GenerationRequest(prompt="a cat", negative="n" * 51, width=64, height=64,
                                      steps=2)
    with pytest.raises(PromptTooLong, match="negative prompt is 51 characters; the limit is 50"):
        long_negative.check_limits(limits)
    with pytest.raises(PromptTooLong, match="prompt is 51 characters; the limit is 50"):
        check_text_length("p" * 51, 50)
