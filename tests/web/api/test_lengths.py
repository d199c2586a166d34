"""Where a prompt enters through an API, its length (and the negative's) is checked first:
before the image beside it is decoded, and named by the API's own field."""

from __future__ import annotations

import base64

import pytest

from core.settings import Limits
from web.api.sdapi_models import FieldError, Img2ImgPayload, Txt2ImgPayload, to_generation_request
from web.api.v1 import JobSubmit, to_request

LIMITS = Limits(max_prompt_chars=100)
NOT_AN_IMAGE = base64.b64encode(b"not an image at all").decode()


@pytest.mark.parametrize(("fields", "field"), [
    ({"prompt": "p" * 101}, "prompt"),
    ({"prompt": "a fox", "negative": "n" * 101}, "negative"),
])
def test_rest_texts_are_checked_before_the_image(fields: dict[str, str], field: str) -> None:
    body = JobSubmit(**fields, kind="img2img", init_image=NOT_AN_IMAGE)  # type: ignore[arg-type]
    with pytest.raises(FieldError) as caught:
        to_request(body, LIMITS)
    assert caught.value.field == field
    assert caught.value.message == f"{field}: is 101 characters; the limit is 100"


@pytest.mark.parametrize(("fields", "field"), [
    ({"prompt": "p" * 101}, "prompt"),
    ({"prompt": "a fox", "negative_prompt": "n" * 101}, "negative_prompt"),
])
def test_a1111_texts_are_checked_before_the_image(fields: dict[str, str], field: str) -> None:
    for payload in (Img2ImgPayload(**fields, init_images=[NOT_AN_IMAGE]),
                    Txt2ImgPayload(**fields)):
        with pytest.raises(FieldError) as caught:
            to_generation_request(payload, limits=LIMITS)
        assert caught.value.field == field
        assert caught.value.message == f"{field}: is 101 characters; the limit is 100"
