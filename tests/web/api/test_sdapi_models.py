"""The A1111 payload translation: what webuiapi sends becomes our request; what we cannot
honour is a FieldError naming the field; info carries A1111's keys."""

from __future__ import annotations

import base64
import io
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from PIL import Image

from core.request import JobKind
from core.settings import Limits
from web.api.sdapi_models import (
    FieldError,
    Img2ImgPayload,
    Txt2ImgPayload,
    checkpoint_name,
    fit_to_model,
    info_json,
    parameters_echo,
    parse_payload,
    to_generation_request,
)

LIMITS = Limits()


def _b64_png(color: int = 128, mode: str = "RGB", prefix: bool = True) -> str:
    buf = io.BytesIO()
    Image.new(mode, (64, 64), color).save(buf, format="PNG")
    raw = base64.b64encode(buf.getvalue()).decode()
    return "data:image/png;base64," + raw if prefix else raw


# What webuiapi 0.9 sends for txt2img by default (trimmed of None-valued extras).
WEBUIAPI_DEFAULTS: dict[str, Any] = {
    "enable_hr": False, "hr_scale": 2, "hr_upscaler": "Latent", "denoising_strength": 0.7,
    "prompt": "", "styles": [], "seed": -1, "subseed": -1, "subseed_strength": 0.0,
    "batch_size": 1, "n_iter": 1, "steps": 20, "cfg_scale": 7.0, "width": 512, "height": 512,
    "restore_faces": False, "tiling": False, "negative_prompt": "", "eta": 1.0,
    "override_settings": {}, "override_settings_restore_afterwards": True,
    "sampler_name": "Euler a", "scheduler": "automatic", "sampler_index": "Euler a",
    "script_name": None, "script_args": [], "send_images": True, "save_images": False,
    "alwayson_scripts": {},
}


def _txt(**fields: Any) -> Txt2ImgPayload:
    return parse_payload(Txt2ImgPayload, {**WEBUIAPI_DEFAULTS, **fields})


def test_webuiapi_defaults_translate_with_unknown_fields_ignored() -> None:
    payload = _txt(prompt="a red fox", negative_prompt="blurry", seed=42, steps=3,
                   cfg_scale=6.5, width=64, height=96, batch_size=2, n_iter=2,
                   some_future_field={"x": 1})
    req = to_generation_request(payload, limits=LIMITS, model="tiny")
    assert (req.prompt, req.negative, req.seed, req.steps) == ("a red fox", "blurry", 42, 3)
    assert (req.guidance, req.width, req.height, req.count) == (6.5, 64, 96, 4)
    assert (req.scheduler, req.model, req.kind, req.raw) == ("Euler a", "tiny", JobKind.txt2img,
                                                             True)


def test_seed_minus_one_is_random_and_samplers_combine_with_karras() -> None:
    assert to_generation_request(_txt(prompt="x"), limits=LIMITS).seed is None
    req = to_generation_request(
        _txt(prompt="x", sampler_name="DPM++ 2M", scheduler="Karras"), limits=LIMITS
    )
    assert req.scheduler == "DPM++ 2M Karras"
    assert to_generation_request(
        _txt(prompt="x", sampler_name="dpm++ 2m karras", scheduler=None), limits=LIMITS
    ).scheduler == "DPM++ 2M Karras"


def test_override_checkpoint_wins_over_the_keys_model() -> None:
    payload = _txt(prompt="x", override_settings={"sd_model_checkpoint": "tiny-xl [0123abcd]"})
    assert to_generation_request(payload, limits=LIMITS, model="tiny").model == "tiny-xl"
    assert checkpoint_name("tiny.safetensors") == "tiny"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"enable_hr": True}, "enable_hr"),
        ({"restore_faces": True}, "restore_faces"),
        ({"tiling": True}, "tiling"),
        ({"subseed_strength": 0.3}, "subseed_strength"),
        ({"script_name": "prompt matrix"}, "script_name"),  # only the X/Y/Z plot runs
        ({"alwayson_scripts": {"ADetailer": {"args": [True, {"ad_model": "face"}]}}},
         "alwayson_scripts.ADetailer"),
        ({"alwayson_scripts": {"ControlNet": {"args": [{"image": "x"}]}}},
         "alwayson_scripts.controlnet.args[0].image"),
        ({"alwayson_scripts": {"ControlNet": {"args": [{"module": "depth_midas"}]}}},
         "alwayson_scripts.controlnet.args[0].module"),
        ({"alwayson_scripts": {"ControlNet": {"args": [{"module": "canny"}]}}},
         "alwayson_scripts.controlnet.args[0].image"),
        ({"alwayson_scripts": {"controlnet": {"args": [
            {"module": "canny", "image": _b64_png(), "guidance_start": 0.7, "guidance_end": 0.2}
        ]}}}, "alwayson_scripts.controlnet.args[0].guidance_end"),
        ({"alwayson_scripts": {"controlnet": {"args": [
            {"module": "canny", "image": _b64_png()}, {"module": "scribble", "image": _b64_png()}
        ]}}}, "alwayson_scripts.controlnet.args"),
        ({"sampler_name": "Heun"}, "sampler_name"),
        ({"scheduler": "Exponential"}, "scheduler"),
        ({"batch_size": 3, "n_iter": 2}, "batch_size"),
        ({"width": 100}, "width"),
        ({"cfg_scale": 99}, "cfg_scale"),
        ({"steps": 0}, "steps"),
        ({"seed": -5}, "seed"),
        ({"prompt": "   "}, "prompt"),
        ({"override_settings": {"sd_model_checkpoint": 3}},
         "override_settings.sd_model_checkpoint"),
    ],
)
def test_fields_we_cannot_honour_are_named(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(FieldError) as err:
        to_generation_request(_txt(**{"prompt": "x", **fields}), limits=LIMITS)
    assert err.value.field == field
    assert err.value.message.startswith(f"{field}: ")


def test_bad_json_types_name_the_field() -> None:
    with pytest.raises(FieldError) as err:
        parse_payload(Txt2ImgPayload, {"prompt": "x", "steps": "many"})
    assert err.value.field == "steps"
    with pytest.raises(FieldError) as err:
        parse_payload(Txt2ImgPayload, ["not", "an", "object"])
    assert err.value.field == "body"


def test_disabled_extensions_are_harmless() -> None:
    payload = _txt(prompt="x", alwayson_scripts={"ControlNet": {"args": []},
                                                  "ADetailer": {"args": [False]}})
    assert to_generation_request(payload, limits=LIMITS).prompt == "x"


def test_a_controlnet_unit_as_the_extension_sends_it() -> None:
    unit = {
        "enabled": True, "module": "canny", "model": "control_v11p_sd15_canny [d14c016b]",
        "weight": 0.8, "image": _b64_png(prefix=False), "resize_mode": "Crop and Resize",
        "low_vram": False, "processor_res": 512, "threshold_a": 50, "threshold_b": 150,
        "guidance_start": 0.1, "guidance_end": 0.9, "control_mode": 0, "pixel_perfect": False,
    }
    off = {**unit, "enabled": False, "module": "scribble"}
    payload = _txt(prompt="x", alwayson_scripts={"controlnet": {"args": [off, unit]}})
    control = to_generation_request(payload, limits=LIMITS).control
    assert control is not None
    assert (control.controlnet, control.preprocessor, control.weight) == (
        "control_v11p_sd15_canny", "canny", 0.8)
    assert (control.start, control.end, control.low, control.high) == (0.1, 0.9, 50, 150)
    assert control.image.startswith(b"\x89PNG")  # re-encoded by the bomb-safe check
    # No picture of its own: the img2img init image, as the extension does; model None: the
    # catalogue's ControlNet for the preprocessor.
    bare = {"module": "scribble", "model": "None"}
    img = parse_payload(Img2ImgPayload, {**WEBUIAPI_DEFAULTS, "prompt": "x",
                                         "init_images": [_b64_png(200)],
                                         "alwayson_scripts": {"ControlNet": {"args": [bare]}}})
    request = to_generation_request(img, limits=LIMITS)
    assert request.control is not None and request.control.controlnet is None
    assert request.control.image == request.init_image


def test_img2img_and_inpaint() -> None:
    payload = parse_payload(
        Img2ImgPayload,
        {"prompt": "x", "init_images": [_b64_png()], "denoising_strength": 0.4, "width": 64,
         "height": 64, "steps": 5},
    )
    req = to_generation_request(payload, limits=LIMITS)
    assert req.kind is JobKind.img2img and req.strength == 0.4 and req.init_image
    assert Image.open(io.BytesIO(req.init_image)).size == (64, 64)
    masked = parse_payload(
        Img2ImgPayload,
        {"prompt": "x", "init_images": [_b64_png(prefix=False)], "mask": _b64_png(255, "L"),
         "inpainting_mask_invert": 1},
    )
    req = to_generation_request(masked, limits=LIMITS)
    assert req.kind is JobKind.inpaint and req.mask is not None
    assert Image.open(io.BytesIO(req.mask)).getpixel((0, 0)) == 0  # inverted


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({}, "init_images"),
        ({"init_images": [_b64_png(), _b64_png()]}, "init_images"),
        ({"init_images": ["!!!not base64"]}, "init_images"),
        ({"init_images": [base64.b64encode(b"GIF89a nonsense").decode()]}, "init_images"),
        ({"init_images": [_b64_png()], "resize_mode": 1}, "resize_mode"),
        ({"init_images": [_b64_png()], "denoising_strength": 0}, "denoising_strength"),
        ({"init_images": [_b64_png()], "mask": "@@"}, "mask"),
    ],
)
def test_img2img_errors_name_the_field(fields: dict[str, Any], field: str) -> None:
    payload = parse_payload(Img2ImgPayload, {"prompt": "x", **fields})
    with pytest.raises(FieldError) as err:
        to_generation_request(payload, limits=LIMITS)
    assert err.value.field == field


def test_info_and_parameters_have_a1111_shapes() -> None:
    payload = _txt(prompt="a fox", seed=7, steps=3, width=64, height=64, batch_size=2)
    req = to_generation_request(payload, limits=LIMITS).model_copy(update={"seed": 7})
    info = json.loads(info_json(
        req, seeds=[7, 8], infotexts=["a", "b"], model="tiny", job_id="j",
        created_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    ))
    assert (info["seed"], info["all_seeds"], info["steps"], info["cfg_scale"]) == (7, [7, 8], 3, 7)
    assert (info["sd_model_name"], info["infotexts"], info["job_timestamp"]) == (
        "tiny", ["a", "b"], "20260102030405")
    assert info["denoising_strength"] is None
    assert parameters_echo(payload)["seed"] == 7
    img = parse_payload(Img2ImgPayload, {"prompt": "x", "init_images": [_b64_png()]})
    assert parameters_echo(img)["init_images"] is None


def test_what_a_payload_leaves_out_is_left_to_the_model() -> None:
    req = to_generation_request(parse_payload(Txt2ImgPayload, {"prompt": "x"}), limits=LIMITS)
    assert req.unresolved == ("width", "height", "steps", "guidance", "scheduler")
    nulls = {"prompt": "x", "steps": None, "width": None, "cfg_scale": None}
    assert to_generation_request(parse_payload(Txt2ImgPayload, nulls), limits=LIMITS).steps is None


def test_a_size_past_the_models_is_scaled_down_keeping_its_shape() -> None:
    req = to_generation_request(_txt(prompt="x", width=512, height=512, steps=20), limits=LIMITS)
    fitted = fit_to_model(req, max_width=128, max_height=128)
    assert (fitted.width, fitted.height, fitted.steps) == (128, 128, 20)
    wide = req.model_copy(update={"width": 768, "height": 512})
    assert (fit_to_model(wide, max_width=128, max_height=128).width,
            fit_to_model(wide, max_width=128, max_height=128).height) == (128, 80)
    one = req.model_copy(update={"height": None})
    assert fit_to_model(one, max_width=128, max_height=128).width == 128
    assert fit_to_model(req, max_width=1024, max_height=1024) is req


def test_info_reports_the_prompts_the_images_were_made_with() -> None:
    req = to_generation_request(_txt(prompt="a fox", negative_prompt="blurry", seed=7),
                                limits=LIMITS)
    used = "a fox\nNegative prompt: blurry, nsfw, nude\nSteps: 3, Sampler: Euler, CFG scale: 7, " \
           "Seed: 7, Size: 64x64"
    info = json.loads(info_json(req, seeds=[7], infotexts=[used], model="tiny", job_id="j",
                                created_at=datetime(2026, 1, 2, tzinfo=UTC)))
    assert (info["prompt"], info["negative_prompt"]) == ("a fox", "blurry, nsfw, nude")
    assert info["all_negative_prompts"] == ["blurry, nsfw, nude"]
