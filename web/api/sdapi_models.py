"""AUTOMATIC1111 ``/sdapi/v1`` payloads and responses, and their translation to and from our
``GenerationRequest``: pure functions, no I/O. Unknown fields are ignored as A1111 ignores
them; a field we cannot honour with a value that would change the result is a FieldError
naming it (HTTP 422)."""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.control import ControlUnit, preprocessor_for
from core.errors import InvalidRequest
from core.flags import fit_size
from core.images import validate_image, validate_mask
from core.infotext import Infotext, parse_infotext
from core.request import SCHEDULERS, GenerationRequest, JobKind, canonical_scheduler
from core.settings import Limits
from web.errors import FieldError as FieldError  # raised here, and by the API routes

A1111_VERSION = "v1.10.1"  # the API shape we follow
# Our request's field -> the A1111 field a person wrote (for errors that name the field).
_A1111_NAME = {
    "prompt": "prompt",
    "negative": "negative_prompt",
    "styles": "styles",
    "width": "width",
    "height": "height",
    "steps": "steps",
    "guidance": "cfg_scale",
    "scheduler": "sampler_name",
    "seed": "seed",
    "count": "batch_size",
    "model": "override_settings.sd_model_checkpoint",
    "init_image": "init_images",
    "mask": "mask",
    "strength": "denoising_strength",
}
# A1111's separate "scheduler" (v1.9+): these leave the sampler's own schedule as it is.
_PLAIN_SCHEDULES = {"", "automatic", "normal", "default"}


def check_length(text: str, field: str, limit: int) -> None:
    """FieldError naming the limit and the length got for a text over ``limit`` characters:
    checked before the text (or an image beside it) is read any further."""
    if len(text) > limit:
        raise FieldError(field, f"is {len(text)} characters; the limit is {limit}")


class Txt2ImgPayload(BaseModel):
    """The fields of A1111's StableDiffusionTxt2ImgProcessingAPI we read; others are ignored."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] = Field(default_factory=list)
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    sampler_name: str | None = None
    sampler_index: str | None = None  # deprecated name of sampler_name
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    # Left out (or null): the model's own defaults (models.toml), not A1111's 50 steps at 512².
    steps: int | None = None
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    restore_faces: bool | None = None
    tiling: bool | None = None
    enable_hr: bool = False
    denoising_strength: float | None = None
    override_settings: dict[str, Any] = Field(default_factory=dict)
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    send_images: bool = True


class Img2ImgPayload(Txt2ImgPayload):
    """StableDiffusionImg2ImgProcessingAPI: an init image, an optional mask, the strength."""

    init_images: list[str] = Field(default_factory=list)
    mask: str | None = None
    resize_mode: int = 0
    inpainting_mask_invert: int = 0
    denoising_strength: float | None = 0.75
    include_init_images: bool = False


class GenerationResponse(BaseModel):
    """A1111's TextToImageResponse / ImageToImageResponse."""

    images: list[str]
    parameters: dict[str, Any]
    info: str


class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    stopping_generation: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: ProgressState
    current_image: str | None = None
    textinfo: str | None = None


class PngInfoRequest(BaseModel):
    image: str


class PngInfoResponse(BaseModel):
    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]


def parse_payload(cls: type[Txt2ImgPayload], body: object) -> Txt2ImgPayload:
    """Validate a JSON body; a FieldError naming the first bad field otherwise."""
    try:
        return cls.model_validate(body)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "body"
        raise FieldError(field, err["msg"]) from None


def sampler_of(payload: Txt2ImgPayload) -> str | None:
    """Our scheduler name from A1111's sampler_name (+ its separate scheduler since v1.9);
    None when neither names one (the model's default sampler)."""
    schedule = (payload.scheduler or "").strip().casefold()
    if not (payload.sampler_name or payload.sampler_index) and schedule in _PLAIN_SCHEDULES:
        return None
    name = payload.sampler_name or payload.sampler_index or "Euler a"
    field = "sampler_name" if payload.sampler_name else "sampler_index"
    if schedule not in _PLAIN_SCHEDULES:
        if schedule != "karras":
            raise FieldError(
                "scheduler", f"Atelier runs the samplers' own schedule or Karras, got "
                f"{payload.scheduler!r}; use automatic or karras"
            )
        name = f"{name} Karras"
    try:
        return canonical_scheduler(name)
    except InvalidRequest:
        raise FieldError(
            field, f"unknown sampler {name!r}; choose one of: {', '.join(SCHEDULERS)}"
        ) from None


def checkpoint_name(title: str) -> str:
    """A model name from an A1111 checkpoint title: "tiny [abc123]" or "tiny.safetensors"."""
    name = title.strip()
    if name.endswith("]") and " [" in name:
        name = name[: name.rindex(" [")]
    for suffix in (".safetensors", ".ckpt"):
        name = name.removesuffix(suffix)
    return name.strip()


def _refuse_unsupported(payload: Txt2ImgPayload) -> None:
    """Fields whose value would change the result in A1111 and that Atelier cannot honour."""
    if payload.enable_hr:
        raise FieldError("enable_hr", "hires fix is not supported; upscale the result instead")
    if payload.restore_faces:
        raise FieldError("restore_faces", "face restoration is not supported")
    if payload.tiling:
        raise FieldError("tiling", "tiling is not supported")
    if payload.subseed_strength:
        raise FieldError("subseed_strength", "variation seeds are not supported; use 0")
    if payload.script_name and not (
        is_xyz_script(payload.script_name) and not isinstance(payload, Img2ImgPayload)
    ):
        raise FieldError(
            "script_name",
            f"only \"x/y/z plot\" (txt2img) is supported, got {payload.script_name!r}",
        )
    for name, script in payload.alwayson_scripts.items():
        if name.lower() == CONTROLNET_SCRIPT:
            continue  # read by control_unit
        args = script.get("args") if isinstance(script, dict) else script
        # Clients send disabled extensions as {"args": []} or {"args": [False]}: harmless.
        if args and args != [False]:
            raise FieldError(f"alwayson_scripts.{name}", "extensions are not supported")
    if isinstance(payload, Img2ImgPayload) and payload.resize_mode != 0:
        raise FieldError(
            "resize_mode", f"only 0 (just resize) is supported, got {payload.resize_mode}"
        )


def is_xyz_script(name: str | None) -> bool:
    """Whether ``script_name`` names A1111's X/Y/Z plot (as clients spell it)."""
    return bool(name) and " ".join(str(name).split()).casefold() in XYZ_SCRIPT_NAMES


XYZ_SCRIPT_NAMES = frozenset({"x/y/z plot", "xyz plot", "xyz_grid", "x/y/z grid"})


CONTROLNET_SCRIPT = "controlnet"
_MODEL_HASH = re.compile(r"\s*\[[0-9a-fA-F]+\]$")


def control_unit(
    payload: Txt2ImgPayload, limits: Limits, init_image: bytes | None
) -> ControlUnit | None:
    """The one enabled unit of A1111's ControlNet extension (``alwayson_scripts.controlnet``,
    as SillyTavern and other clients send it), or None. The unit's picture is its ``image`` (or
    the older ``input_image``), else the img2img init image, as the extension does."""
    script = next(
        (v for k, v in payload.alwayson_scripts.items() if k.lower() == CONTROLNET_SCRIPT), None
    )
    args = script.get("args") if isinstance(script, dict) else script
    if not args:
        return None
    if not isinstance(args, list):
        raise FieldError("alwayson_scripts.controlnet.args", "must be a list of units")
    units = [(i, a) for i, a in enumerate(args) if isinstance(a, dict) and a.get("enabled", True)]
    if len(units) > 1:
        raise FieldError("alwayson_scripts.controlnet.args",
                         f"Atelier runs one ControlNet unit, got {len(units)} enabled")
    if not units:
        return None
    i, arg = units[0]
    where = f"alwayson_scripts.controlnet.args[{i}]"
    model = str(arg.get("model") or "").strip()
    model = _MODEL_HASH.sub("", model)
    module = str(arg.get("module") or "none")
    try:
        preprocessor = preprocessor_for(module)
    except InvalidRequest as exc:
        raise FieldError(f"{where}.module", exc.message) from None
    picture = arg.get("image", arg.get("input_image"))
    if isinstance(picture, dict):  # the newer {"image": ..., "mask": ...} shape
        picture = picture.get("image")
    if picture:
        if not isinstance(picture, str):
            raise FieldError(f"{where}.image", "must be a base64 image")
        image = _checked(decode_b64_image(picture, f"{where}.image"), f"{where}.image", limits)
    elif init_image is not None:
        image = init_image
    else:
        raise FieldError(f"{where}.image", "a ControlNet unit needs a picture")
    fields: dict[str, Any] = {
        "controlnet": model if model and model.lower() != "none" else None,
        "preprocessor": preprocessor, "image": image,
        "weight": arg.get("weight", 1.0),
        "start": arg.get("guidance_start", 0.0), "end": arg.get("guidance_end", 1.0),
    }
    if preprocessor == "canny":
        fields |= {"low": arg.get("threshold_a", 100), "high": arg.get("threshold_b", 200)}
    try:
        return ControlUnit(**fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        message = err["msg"].removeprefix("Value error, ")
        # A check across fields has no location: the field its message is about.
        whole = "end" if "end must be" in message else "high" if "threshold" in message else "model"
        field = str(err["loc"][0]) if err["loc"] else whole
        a1111 = {"start": "guidance_start", "end": "guidance_end", "low": "threshold_a",
                 "high": "threshold_b"}.get(field, field)
        raise FieldError(f"{where}.{a1111}", message) from None


def decode_b64_image(text: str, field: str) -> bytes:
    """The bytes of a base64 image, with or without a ``data:image/...;base64,`` prefix."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise FieldError(field, "is not valid base64") from None


def _invert(png: bytes) -> bytes:
    with Image.open(io.BytesIO(png)) as img:
        out = io.BytesIO()
        ImageOps.invert(img.convert("L")).save(out, format="PNG")
    return out.getvalue()


def to_generation_request(
    payload: Txt2ImgPayload, *, limits: Limits, model: str | None = None
) -> GenerationRequest:
    """Our request for an A1111 payload. ``model``: the key's chosen checkpoint, used when
    the payload's override_settings names none. Raises FieldError naming the A1111 field.
    Decodes and re-encodes images: call it off the event loop."""
    check_length(payload.prompt, "prompt", limits.max_prompt_chars)
    check_length(payload.negative_prompt, "negative_prompt", limits.max_prompt_chars)
    _refuse_unsupported(payload)
    if payload.n_iter < 1:
        raise FieldError("n_iter", f"must be at least 1, got {payload.n_iter}")
    if payload.batch_size < 1:
        raise FieldError("batch_size", f"must be at least 1, got {payload.batch_size}")
    count = payload.n_iter * payload.batch_size
    if count > limits.max_count:
        raise FieldError(
            "batch_size", f"n_iter x batch_size must be at most {limits.max_count}, "
            f"got {payload.n_iter} x {payload.batch_size}"
        )
    if payload.seed < -1:
        raise FieldError("seed", f"must be -1 (random) or at least 0, got {payload.seed}")
    override = payload.override_settings.get("sd_model_checkpoint")
    if override is not None and not isinstance(override, str):
        raise FieldError("override_settings.sd_model_checkpoint", "must be a string")
    fields: dict[str, Any] = {
        "prompt": payload.prompt,
        "negative": payload.negative_prompt,
        "styles": tuple(payload.styles),
        "width": payload.width,
        "height": payload.height,
        "steps": payload.steps,
        "guidance": payload.cfg_scale,
        "scheduler": sampler_of(payload),
        "seed": None if payload.seed == -1 else payload.seed,
        "count": count,
        "model": checkpoint_name(override) if override else model,
        # A1111 adds nothing to a prompt: no quality tokens, no default negative.
        "raw": True,
    }
    if isinstance(payload, Img2ImgPayload):
        if not payload.init_images:
            raise FieldError("init_images", "img2img needs one init image")
        if len(payload.init_images) > 1:
            raise FieldError(
                "init_images", f"Atelier takes one init image, got {len(payload.init_images)}"
            )
        fields["init_image"] = _checked(
            decode_b64_image(payload.init_images[0], "init_images"), "init_images", limits
        )
        fields["kind"] = JobKind.img2img
        if payload.denoising_strength is not None:
            fields["strength"] = payload.denoising_strength
        if payload.mask:
            mask = _checked(decode_b64_image(payload.mask, "mask"), "mask", limits, mask=True)
            fields["mask"] = _invert(mask) if payload.inpainting_mask_invert else mask
            fields["kind"] = JobKind.inpaint
    fields["control"] = control_unit(payload, limits, fields.get("init_image"))
    try:
        return GenerationRequest(**fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        ours = str(err["loc"][0]) if err["loc"] else "prompt"
        raise FieldError(
            _A1111_NAME.get(ours, ours), err["msg"].removeprefix("Value error, ")
        ) from None


def _checked(data: bytes, field: str, limits: Limits, *, mask: bool = False) -> bytes:
    check = validate_mask if mask else validate_image
    try:
        return check(
            data, max_bytes=limits.max_upload_bytes, max_pixels=limits.max_upload_pixels,
            purpose=field,
        ).png
    except InvalidRequest as exc:
        raise FieldError(field, exc.message) from None


def parameters_echo(payload: Txt2ImgPayload) -> dict[str, Any]:
    """A1111's ``parameters``: the request as understood, images left out unless asked."""
    out = payload.model_dump()
    if isinstance(payload, Img2ImgPayload) and not payload.include_init_images:
        out["init_images"] = None
        out["mask"] = None
    return out


def fit_to_model(request: GenerationRequest, *, max_width: int, max_height: int,
                 ) -> GenerationRequest:
    """``request`` at a size its model draws: A1111 clients send their own size (webuiapi
    always 512x512) and cannot ask a model's limits, so a larger one is scaled down, keeping
    its shape; ``info`` then reports what was used. (Steps past the model's are refused: a
    client sends those only when asked to.)"""
    width, height = request.width, request.height
    if width is None or height is None:  # one side given: the other is the model's default
        fitted = (min(width, max_width) if width is not None else None,
                  min(height, max_height) if height is not None else None)
    else:
        fitted = fit_size(width, height, max_width, max_height)
    if fitted == (width, height):
        return request
    return request.model_copy(update={"width": fitted[0], "height": fitted[1]})


def info_json(
    request: GenerationRequest,
    *,
    seeds: Sequence[int],
    infotexts: Sequence[str],
    model: str,
    job_id: str,
    created_at: datetime,
) -> str:
    """A1111's ``info`` string: processing.js() with the keys clients read. The prompts and
    negative prompts are those the images were made with, read from their infotexts
    (Atelier's safety terms included), else the request's."""
    seed = seeds[0] if seeds else (request.seed or 0)
    used = [_used_prompts(text, request) for text in infotexts] or [
        (request.prompt, request.negative)
    ]
    return json.dumps(
        {
            "prompt": used[0][0],
            "all_prompts": [p for p, _ in used],
            "negative_prompt": used[0][1],
            "all_negative_prompts": [n for _, n in used],
            "seed": seed,
            "all_seeds": list(seeds),
            "subseed": seed,
            "all_subseeds": list(seeds),
            "subseed_strength": 0,
            "width": request.width,
            "height": request.height,
            "sampler_name": request.scheduler,
            "cfg_scale": request.guidance,
            "steps": request.steps,
            "batch_size": request.count,
            "restore_faces": False,
            "face_restoration_model": None,
            "sd_model_name": model,
            "sd_model_hash": None,
            "sd_vae_name": None,
            "sd_vae_hash": None,
            "seed_resize_from_w": -1,
            "seed_resize_from_h": -1,
            "denoising_strength": (
                request.strength if request.kind is not JobKind.txt2img else None
            ),
            "extra_generation_params": {},
            "index_of_first_image": 0,
            "infotexts": list(infotexts),
            "styles": list(request.styles),
            "job_timestamp": created_at.strftime("%Y%m%d%H%M%S"),
            "clip_skip": 1,
            "is_using_inpainting_conditioning": request.kind is JobKind.inpaint,
            "version": f"atelier ({A1111_VERSION} API)",
            "job_id": job_id,
        }
    )


def _used_prompts(infotext: str, request: GenerationRequest) -> tuple[str, str]:
    try:
        parsed = parse_infotext(infotext)
    except InvalidRequest:
        return request.prompt, request.negative
    return parsed.prompt, parsed.negative


def infotext_items(info: Infotext) -> dict[str, Any]:
    """png-info's ``parameters``: the infotext as A1111's parse_generation_parameters keys."""
    out: dict[str, Any] = {
        "Prompt": info.prompt,
        "Negative prompt": info.negative,
        "Steps": str(info.steps),
        "Sampler": info.sampler,
        "CFG scale": str(info.cfg_scale),
        "Seed": str(info.seed),
        "Size-1": str(info.width),
        "Size-2": str(info.height),
    }
    if info.model:
        out["Model"] = info.model
    if info.denoising_strength is not None:
        out["Denoising strength"] = str(info.denoising_strength)
    if info.styles:
        out["Styles array"] = list(info.styles)
    out.update(info.extra)
    return out

