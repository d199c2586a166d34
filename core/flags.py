"""Chat flag syntax, Midjourney-like: ``a cat --ar 16:9 --seed 42 --style anime`` <-> request.

The prompt comes first; each ``--flag`` takes the text up to the next flag as its value.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from pydantic import ValidationError

from core.adapters import AdapterRef, parse_adapter
from core.control import PREPROCESSORS, ControlUnit, preprocessor_for
from core.errors import InvalidRequest
from core.prompts import normalize
from core.request import GenerationRequest, canonical_scheduler, check_text_length
from core.settings import Limits
from core.styles import StyleRegistry, default_registry, merge_terms, style_key

# field (or "ar") -> the flag names that set it; the first is the one format_request writes.
FLAG_NAMES: dict[str, tuple[str, ...]] = {
    "ar": ("ar",),
    "width": ("w", "width"),
    "height": ("h", "height"),
    "seed": ("seed",),
    "steps": ("steps",),
    "guidance": ("cfg", "guidance"),
    "styles": ("style", "styles"),
    "negative": ("no",),
    "count": ("n", "count"),
    "raw": ("raw",),
    "scheduler": ("sampler", "scheduler"),
    "model": ("model",),
    "strength": ("strength",),
    "adapters": ("lora",),
    "control": ("control",),
    "control_weight": ("control-weight",),
    "control_start": ("control-start",),
    "control_end": ("control-end",),
}
# Flags of the ControlNet unit (``ControlFlags``): its picture is an attachment, not text.
_CONTROL_FIELDS = {"control": "preprocessor", "control_weight": "weight",
                   "control_start": "start", "control_end": "end"}
CONTROL_NEEDS_PICTURE = "--control needs a picture: attach one"
_ALIASES: dict[str, str] = {alias: field for field, names in FLAG_NAMES.items() for alias in names}
_EXAMPLES: dict[str, str] = {
    "ar": "16:9",
    "width": "768",
    "height": "512",
    "seed": "42",
    "steps": "30",
    "guidance": "6.5",
    "styles": "anime,watercolor",
    "negative": "blurry, text",
    "count": "4",
    "scheduler": "DPM++ 2M Karras",
    "model": "sdxl",
    "strength": "0.6",
    "adapters": "ink:0.8",
    "control": "canny",
    "control_weight": "0.8",
    "control_start": "0.1",
    "control_end": "0.7",
}
# Flags whose value is free text and may repeat (their values are merged).
_REPEATABLE = frozenset({"styles", "negative", "adapters"})
# User settings that ``parse_command(defaults=...)`` accepts.
DEFAULT_KEYS = frozenset(
    {"negative", "styles", "width", "height", "steps", "guidance", "scheduler", "count"}
    | {"model", "raw", "strength"}
)
_CLEAR = frozenset({"none"})  # "--style none", "--no none": clear what a default set
_MODEL_DEFAULT = frozenset({"none", "default"})  # "--model default": the deployment's default
_TRUE = frozenset({"on", "true", "yes", "1"})
_FALSE = frozenset({"off", "false", "no", "0"})
# Aspect ratios outside this range give slivers no model was trained on.
MAX_ASPECT = 4.0
BASE_SIDE = 512

# A flag starts a whitespace-separated token with "--" (or an em/en dash: phones turn "--"
# into "—") followed by a letter, so "state-of-the-art" and "a -- b" stay prompt text.
_FLAG_RE = re.compile(r"(?<!\S)(?:--|[\u2014\u2013])(?=[A-Za-z])(\S+)")
_INT_RE = re.compile(r"[0-9]+")
_FLOAT_RE = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")
_AR_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*[:x×/]\s*([0-9]+(?:\.[0-9]+)?)")
_MODEL_RE = re.compile(r"[A-Za-z0-9][\w.:/+-]*")
# Room for the flags around a prompt and a negative each of the longest length allowed.
FLAGS_ALLOWANCE = 500


def command_limit(limits: Limits) -> int:
    """The most characters a command may have: checked before anything reads it."""
    return 2 * limits.max_prompt_chars + FLAGS_ALLOWANCE


def flags_help() -> str:
    """One line listing every flag with an example, for error messages and /help."""
    parts = []
    for field, names in FLAG_NAMES.items():
        spelled = "/".join(f"--{n}" for n in names)
        example = _EXAMPLES.get(field)
        parts.append(f"{spelled} {example}" if example else spelled)
    return "; ".join(parts)


@dataclass(frozen=True)
class _Flag:
    field: str
    typed: str  # as the user wrote it, for messages: "--cfg"
    value: str


@dataclass(frozen=True)
class ControlFlags:
    """``--control`` and its settings, checked: ``unit`` adds the attached picture."""

    controlnet: str | None
    preprocessor: str | None
    weight: float
    start: float
    end: float

    def unit(self, image: bytes) -> ControlUnit:
        """The ControlNet unit with ``image`` (a PNG from ``validate_image``) as its picture."""
        return ControlUnit.model_validate({**asdict(self), "image": image})


def _control(given: dict[str, _Flag]) -> ControlFlags | None:
    """The ControlNet flags checked as ``ControlUnit`` checks them, each bad value named."""
    if not any(field in given for field in _CONTROL_FIELDS):
        return None
    if "control" not in given:
        typed = next(given[f].typed for f in _CONTROL_FIELDS if f in given)
        raise InvalidRequest(f"{typed} sets the ControlNet of --control, which is not given")
    name = _need(given["control"])
    fields: dict[str, Any] = {"controlnet": None, "preprocessor": None}
    try:
        fields["preprocessor"] = preprocessor_for(name)
    except InvalidRequest:
        # Not a preprocessor: a ControlNet's catalogue name (checked at admission).
        if not _MODEL_RE.fullmatch(name):
            raise InvalidRequest(
                f"--control expects {', '.join(PREPROCESSORS)} or a ControlNet's name, "
                f"got {name!r}"
            ) from None
        fields["controlnet"] = name
    for field in ("control_weight", "control_start", "control_end"):
        if field in given:
            fields[_CONTROL_FIELDS[field]] = _float(given[field])
    try:
        unit = ControlUnit.model_validate({**fields, "image": b""})
    except ValidationError as exc:
        by_field = {v: given[k].typed for k, v in _CONTROL_FIELDS.items() if k in given}
        parts = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "end"
            where = by_field.get(field) or by_field.get("start") or "--control"
            msg = err["msg"].removeprefix("Value error, ")
            parts.append(f"{where}: {msg}, got {err['input']}" if err["loc"] else f"{where}: {msg}")
        raise InvalidRequest("; ".join(parts)) from None
    return ControlFlags(unit.controlnet, unit.preprocessor, unit.weight, unit.start, unit.end)


def _unknown_flag(name: str) -> InvalidRequest:
    known = sorted(_ALIASES, key=len, reverse=True)
    hint = ""
    close = difflib.get_close_matches(name, list(_ALIASES), n=1, cutoff=0.6)
    if close:
        hint = f" (did you mean --{close[0]}?)"
    else:
        # "--ar16:9": a known flag glued to its value.
        glued = next((k for k in known if name.startswith(k) and len(name) > len(k)), None)
        if glued is not None:
            hint = f" (did you mean --{glued} {name[len(glued) :]}?)"
    valid = ", ".join("/".join(f"--{n}" for n in names) for names in FLAG_NAMES.values())
    return InvalidRequest(f"unknown flag --{name}{hint}. Valid flags: {valid}")


def _split(text: str) -> tuple[str, list[_Flag]]:
    matches = list(_FLAG_RE.finditer(text))
    prompt = text[: matches[0].start()] if matches else text
    flags: list[_Flag] = []
    for i, m in enumerate(matches):
        name, eq, inline = m.group(1).partition("=")
        field = _ALIASES.get(name.lower())
        if field is None:
            raise _unknown_flag(name.lower())
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        value = (inline + text[m.end() : end]) if eq else text[m.end() : end]
        flags.append(_Flag(field, f"--{name.lower()}", value.strip()))
    return prompt.strip(), flags


def _need(flag: _Flag) -> str:
    if not flag.value:
        example = _EXAMPLES.get(flag.field, "")
        raise InvalidRequest(f"{flag.typed} needs a value, e.g. {flag.typed} {example}")
    return flag.value


def _int(flag: _Flag, what: str = "a whole number") -> int:
    value = _need(flag)
    if not _INT_RE.fullmatch(value):
        raise InvalidRequest(f"{flag.typed} expects {what}, got {value!r}")
    return int(value)


def _float(flag: _Flag) -> float:
    value = _need(flag)
    # A decimal comma ("7,5") is what half the world types.
    candidate = value.replace(",", ".") if value.count(",") == 1 and "." not in value else value
    if not _FLOAT_RE.fullmatch(candidate):
        raise InvalidRequest(f"{flag.typed} expects a number, got {value!r}")
    return float(candidate)


def _seed(flag: _Flag) -> int | None:
    value = _need(flag)
    if value.lower() in ("random", "-1"):
        return None
    return _int(flag, "a whole number (or 'random')")


def _bool(flag: _Flag) -> bool:
    value = flag.value.lower()
    if not value or value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise InvalidRequest(
        f"{flag.typed} takes no value (or on/off), got {flag.value!r}; "
        "put the prompt before the flags"
    )


def _styles(value: Any, registry: StyleRegistry, typed: str) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [style_key(str(s)) for s in items if str(s).strip()]
    if names in ([], ["none"]):
        return ()
    out: list[str] = []
    for name in names:
        try:
            style = registry.get(name)
        except InvalidRequest as exc:
            raise InvalidRequest(f"{typed}: {exc.message}") from None
        if style.name not in out:
            out.append(style.name)
    return tuple(out)


def _scheduler(flag: _Flag) -> str:
    try:
        return canonical_scheduler(_need(flag))
    except InvalidRequest as exc:
        raise InvalidRequest(f"{flag.typed}: {exc.message}") from None


def _model(flag: _Flag) -> str | None:
    value = _need(flag)
    if value.lower() in _MODEL_DEFAULT:
        return None
    if not _MODEL_RE.fullmatch(value):
        raise InvalidRequest(f"{flag.typed} expects one model name without spaces, got {value!r}")
    return value


def _ratio(flag: _Flag) -> float:
    value = _need(flag)
    m = _AR_RE.fullmatch(value)
    if not m or float(m.group(1)) == 0 or float(m.group(2)) == 0:
        raise InvalidRequest(f"{flag.typed} expects a ratio like 16:9, got {value!r}")
    ratio = float(m.group(1)) / float(m.group(2))
    if not 1 / MAX_ASPECT <= ratio <= MAX_ASPECT:
        raise InvalidRequest(f"{flag.typed} must be between 1:4 and 4:1, got {value!r}")
    return ratio


def _round8(x: float) -> int:
    return max(64, int(round(x / 8)) * 8)


def size_for_aspect(ratio: float, base_side: float = BASE_SIDE) -> tuple[int, int]:
    """Width and height for an aspect ratio with about the pixel area of ``base_side`` squared.

    width = base * sqrt(ratio), height = base / sqrt(ratio), each rounded to a multiple of 8
    (at least 64): 16:9 at 512 -> 680x384, 1:1 -> 512x512, 2:3 -> 416x624.
    """
    root = math.sqrt(ratio)
    width, height = base_side * root, base_side / root
    # A small area (a small model's default) keeps the shape: the short side grows to 64
    # rather than being floored alone, which would square the picture up.
    grow = max(1.0, 64 / min(width, height))
    return _round8(width * grow), _round8(height * grow)


def fit_size(width: int, height: int, max_width: int, max_height: int) -> tuple[int, int]:
    """``width`` x ``height`` scaled down (never up) to fit ``max_width`` x ``max_height``,
    keeping its shape as near as multiples of 8 (at least 64) allow: 512x512 in 128x128 ->
    128x128, 280x210 in 128x128 -> 128x96."""
    scale = min(1.0, max_width / width, max_height / height)
    if scale == 1.0:
        return width, height

    def side(value: int, top: int) -> int:
        return max(64, min(top, int(value * scale) // 8 * 8))

    return side(width, max_width), side(height, max_height)


def _request_default(field: str) -> Any:
    return GenerationRequest.model_fields[field].default


def _check_defaults(defaults: Mapping[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in (defaults or {}).items():
        if key not in DEFAULT_KEYS:
            known = ", ".join(sorted(DEFAULT_KEYS))
            raise InvalidRequest(f"unknown default setting {key!r}; known settings: {known}")
        if value is not None:
            out[key] = value
    return out


def _baseline(
    styles: tuple[str, ...], defaults: dict[str, Any], registry: StyleRegistry
) -> dict[str, Any]:
    """Fields before flags: the styles' suggestions, overridden by the user's own settings."""
    fields: dict[str, Any] = {}
    for name in styles:
        for key, value in registry.get(name).params().items():
            fields.setdefault(key, value)
    fields.update({k: v for k, v in defaults.items() if k != "styles"})
    fields["styles"] = styles
    return fields


def parse_command(
    text: str,
    defaults: Mapping[str, Any] | None = None,
    *,
    registry: StyleRegistry | None = None,
    limits: Limits | None = None,
    control_image: bytes | None = None,
) -> GenerationRequest:
    """Parse ``prompt --flag value ...`` into a request (``parse_flags``); ``--control`` takes
    ``control_image`` (a PNG from ``validate_image``) as its picture, and is refused without."""
    request, control = parse_flags(text, defaults, registry=registry, limits=limits)
    if control is None:
        return request
    if control_image is None:
        raise InvalidRequest(CONTROL_NEEDS_PICTURE)
    return request.model_copy(update={"control": control.unit(control_image)})


def parse_flags(
    text: str,
    defaults: Mapping[str, Any] | None = None,
    *,
    registry: StyleRegistry | None = None,
    limits: Limits | None = None,
) -> tuple[GenerationRequest, ControlFlags | None]:
    """Parse ``prompt --flag value ...`` into a request, and the ``--control`` flags apart
    (their picture comes with the message, checked after the text: ``ControlFlags.unit``).

    Precedence, lowest first: the request model's defaults, the chosen styles' suggested
    params, ``defaults`` (the user's settings: width, height, steps, raw, styles, ...), flags.
    ``--ar W:H`` keeps the pixel area of the size it would otherwise have (512x512 unless
    defaults say otherwise; see ``size_for_aspect``); with ``--w`` or ``--h`` it sets the other.
    ``--style none``, ``--no none`` and ``--model default`` clear what a default set.
    A text longer than ``command_limit(limits)`` (default limits when None) is refused first,
    unread.
    """
    check_text_length(text, command_limit(limits or Limits()), what="the text")
    registry = registry or default_registry()
    user = _check_defaults(defaults)
    prompt, flags = _split(normalize(text))
    if not prompt:
        raise InvalidRequest(
            "write the prompt before the flags, e.g. 'a lighthouse at dusk --ar 16:9'"
        )

    given: dict[str, _Flag] = {}
    negatives: list[str] = []
    style_values: list[str] = []
    lora_values: list[AdapterRef] = []
    for flag in flags:
        if flag.field in given and flag.field not in _REPEATABLE:
            raise InvalidRequest(f"{flag.typed} is given twice ({given[flag.field].typed} too)")
        given[flag.field] = flag
        if flag.field == "negative":
            negatives.append(_need(flag))
        elif flag.field == "styles":
            style_values.append(_need(flag))
        elif flag.field == "adapters":
            lora_values.append(parse_adapter(_need(flag), flag.typed))

    if style_values:
        styles = _styles(",".join(style_values), registry, given["styles"].typed)
    else:
        styles = _styles(user.get("styles", ()), registry, "your default styles")
    fields = _baseline(styles, user, registry)
    source = {key: f"your default {key}" for key in user}

    if negatives:
        kept = [v for v in negatives if v.lower() not in _CLEAR]
        fields["negative"] = merge_terms(*kept) if len(kept) > 1 else "".join(kept)
    control = _control(given)
    for field, flag in given.items():
        if field in _CONTROL_FIELDS:
            continue
        source[field] = flag.typed
        if field in ("width", "height", "steps", "count"):
            fields[field] = _int(flag)
        elif field in ("guidance", "strength"):
            fields[field] = _float(flag)
        elif field == "seed":
            fields[field] = _seed(flag)
        elif field == "raw":
            fields[field] = _bool(flag)
        elif field == "scheduler":
            fields[field] = _scheduler(flag)
        elif field == "model":
            fields[field] = _model(flag)
        elif field == "adapters":
            fields[field] = tuple(lora_values)

    if "ar" in given:
        ratio = _ratio(given["ar"])
        if "width" in given and "height" in given:
            raise InvalidRequest(
                f"{given['ar'].typed} sets the shape from one side; drop --w or --h"
            )
        if "width" in given:
            fields["height"] = _round8(fields["width"] / ratio)
        elif "height" in given:
            fields["width"] = _round8(fields["height"] * ratio)
        else:
            # Without a size the area is 512² (the model, known at submit, is not known here).
            width = fields.get("width") or BASE_SIDE
            height = fields.get("height") or BASE_SIDE
            fields["width"], fields["height"] = size_for_aspect(ratio, math.sqrt(width * height))
        source["width"] = source["height"] = given["ar"].typed

    try:
        return GenerationRequest(prompt=prompt, **fields), control
    except ValidationError as exc:
        parts = []
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "request"
            msg = err["msg"].removeprefix("Value error, ")
            where = source.get(field, field)
            parts.append(f"{where}: {msg}" if where == field else f"{where} ({field}): {msg}")
        raise InvalidRequest("; ".join(parts)) from None


def _number(x: float) -> str:
    text = repr(float(x))
    return text.removesuffix(".0")


def format_request(
    req: GenerationRequest,
    defaults: Mapping[str, Any] | None = None,
    *,
    registry: StyleRegistry | None = None,
) -> str:
    """Flag text for ``req`` that ``parse_command`` (with the same defaults) parses back to it.

    Only fields that differ from what the prompt alone would give are written. Images (init
    image, mask), the ControlNet unit (its picture is an attachment) and the job kind have no
    flag and are left out. A prompt or negative that
    itself contains ``--word`` cannot round-trip.
    """
    registry = registry or default_registry()
    user = _check_defaults(defaults)
    base_styles = _styles(user.get("styles", ()), registry, "your default styles")
    base = _baseline(req.styles, user, registry)

    def differs(field: str) -> bool:
        return bool(getattr(req, field) != base.get(field, _request_default(field)))

    parts = [req.prompt]
    if req.styles != base_styles:
        parts.append(f"--style {','.join(req.styles) if req.styles else 'none'}")
    if differs("negative"):
        parts.append(f"--no {req.negative or 'none'}")
    if differs("width") and req.width is not None:
        parts.append(f"--w {req.width}")
    if differs("height") and req.height is not None:
        parts.append(f"--h {req.height}")
    if differs("steps") and req.steps is not None:
        parts.append(f"--steps {req.steps}")
    if differs("guidance") and req.guidance is not None:
        parts.append(f"--cfg {_number(req.guidance)}")
    if differs("scheduler") and req.scheduler is not None:
        parts.append(f"--sampler {req.scheduler}")
    if req.seed is not None:
        parts.append(f"--seed {req.seed}")
    if differs("count"):
        parts.append(f"--n {req.count}")
    if differs("model"):
        parts.append(f"--model {req.model or 'default'}")
    if differs("strength"):
        parts.append(f"--strength {_number(req.strength)}")
    if differs("raw"):
        parts.append("--raw" if req.raw else "--raw off")
    parts.extend(f"--lora {ref.flag_value()}" for ref in req.adapters)
    return " ".join(parts)
