"""What a person asks for: ``GenerationRequest``, independent of the front end that built it."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, NamedTuple, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from core.adapters import AdapterRef, check_adapters, extract_prompt_adapters
from core.control import ControlUnit
from core.errors import InvalidRequest, PromptTooLong
from core.settings import Limits

MAX_SEED = 2**32 - 1
MAX_STYLES = 4

# A1111 sampler names we accept (the engine maps each to a Diffusers scheduler).
SCHEDULERS: tuple[str, ...] = (
    "Euler a",
    "Euler",
    "DPM++ 2M",
    "DPM++ 2M Karras",
    "DDIM",
    "UniPC",
    "LCM",
)


class JobKind(StrEnum):
    txt2img = "txt2img"
    img2img = "img2img"
    inpaint = "inpaint"
    upscale = "upscale"
    variation = "variation"


class Edit(StrEnum):
    """A named edit of an earlier image, recorded in its infotext (``Edit: Vary (Region)``)."""

    vary_region = "Vary (Region)"  # a painted region repainted with its own prompt


def canonical_scheduler(name: str) -> str:
    """Match a sampler name case- and space-insensitively; raise naming the valid ones."""
    key = " ".join(name.split()).casefold()
    for s in SCHEDULERS:
        if s.casefold() == key:
            return s
    raise InvalidRequest(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")


# What a model's registry entry supplies when the person gives none (None in the request).
MODEL_DEFAULT_FIELDS = ("width", "height", "steps", "guidance", "scheduler")


class Params(NamedTuple):
    """A resolved request's size, steps, guidance and scheduler."""

    width: int
    height: int
    steps: int
    guidance: float
    scheduler: str


@dataclass(frozen=True, slots=True)
class ModelDefaults:
    """A model's defaults for what a person may leave out (the registry entry's, passed in by
    the cluster: core knows the rule, not the registry)."""

    width: int
    height: int
    steps: int
    guidance: float
    scheduler: str


class GenerationRequest(BaseModel):
    """One generation job as asked. Images travel as bytes (base64 in JSON)."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", ser_json_bytes="base64", val_json_bytes="base64"
    )

    prompt: str
    negative: str = ""
    styles: tuple[str, ...] = ()
    # None: not given; the model's default applies (``with_model_defaults``, at submit).
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance: float | None = None
    scheduler: str | None = None
    seed: int | None = None
    count: int = 1
    model: str | None = None
    kind: JobKind = JobKind.txt2img
    init_image: Annotated[bytes | None, Field(repr=False)] = None
    mask: Annotated[bytes | None, Field(repr=False)] = None
    strength: float = 0.75
    raw: bool = False
    # LoRAs by registry name and weight; ``<lora:name:w>`` tags in the prompt land here too.
    adapters: tuple[AdapterRef, ...] = ()
    edit: Edit | None = None  # what made it from an earlier image, for its infotext
    # A ControlNet unit: its picture steers the structure (edges, lines) of the result.
    control: ControlUnit | None = None

    @model_validator(mode="before")
    @classmethod
    def _prompt_adapters(cls, data: object) -> object:
        if not isinstance(data, dict):
            return data
        prompt = data.get("prompt")
        if not isinstance(prompt, str) or "<lora:" not in prompt.lower():
            return data
        try:
            prompt, refs = extract_prompt_adapters(prompt)
        except InvalidRequest as exc:
            raise ValueError(exc.message) from None
        return {**data, "prompt": prompt, "adapters": (*(data.get("adapters") or ()), *refs)}

    @field_validator("adapters")
    @classmethod
    def _adapters(cls, v: tuple[AdapterRef, ...]) -> tuple[AdapterRef, ...]:
        try:
            return check_adapters(v)
        except InvalidRequest as exc:
            raise ValueError(exc.message) from None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError("prompt must not be empty")
        return v

    @field_validator("styles", mode="before")
    @classmethod
    def _styles(cls, v: object) -> object:
        if isinstance(v, str):
            v = [s for s in v.split(",")]
        if isinstance(v, (list, tuple)):
            out: list[str] = []
            for s in v:
                name = str(s).strip().lower()
                if name and name not in out:
                    out.append(name)
            if len(out) > MAX_STYLES:
                raise ValueError(f"at most {MAX_STYLES} styles, got {len(out)}")
            return tuple(out)
        return v

    @field_validator("width", "height")
    @classmethod
    def _side(cls, v: int | None) -> int | None:
        if v is None:
            return v
        if v % 8 != 0:
            raise ValueError(f"must be a multiple of 8, got {v}")
        if v < 64:
            raise ValueError(f"must be at least 64, got {v}")
        return v

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: int | None) -> int | None:
        if v is not None and not 1 <= v <= 150:
            raise ValueError(f"must be between 1 and 150, got {v}")
        return v

    @field_validator("guidance")
    @classmethod
    def _guidance(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 <= v <= 30.0:
            raise ValueError(f"must be between 0 and 30, got {v}")
        return v

    @field_validator("scheduler")
    @classmethod
    def _scheduler(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            return canonical_scheduler(v)
        except InvalidRequest as exc:
            raise ValueError(exc.message) from None

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int | None) -> int | None:
        if v is not None and not 0 <= v <= MAX_SEED:
            raise ValueError(f"must be between 0 and {MAX_SEED}, got {v}")
        return v

    @field_validator("count")
    @classmethod
    def _count(cls, v: int) -> int:
        if not 1 <= v <= 4:
            raise ValueError(f"must be between 1 and 4, got {v}")
        return v

    @field_validator("strength")
    @classmethod
    def _strength(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError(f"must be above 0 and at most 1, got {v}")
        return v

    @model_validator(mode="after")
    def _kind_inputs(self) -> Self:
        needs_image = self.kind in (JobKind.img2img, JobKind.inpaint, JobKind.upscale)
        if needs_image and self.init_image is None:
            raise ValueError(f"a {self.kind.value} job needs an init image")
        if self.kind is JobKind.inpaint and self.mask is None:
            raise ValueError("an inpaint job needs a mask")
        if self.kind is JobKind.txt2img and (self.init_image is not None or self.mask is not None):
            raise ValueError("a txt2img job takes no init image or mask; use img2img or inpaint")
        return self

    # Helpers -----------------------------------------------------------------------

    @property
    def unresolved(self) -> tuple[str, ...]:
        """The fields still "not given" (None): what the model's defaults will fill."""
        return tuple(f for f in MODEL_DEFAULT_FIELDS if getattr(self, f) is None)

    def params(self) -> Params:
        """Size, steps, guidance and scheduler of a request resolved against its model (every
        request past submit). InvalidRequest naming what is unset otherwise."""
        w, h, steps = self.width, self.height, self.steps
        cfg, sampler = self.guidance, self.scheduler
        if w is None or h is None or steps is None or cfg is None or sampler is None:
            raise InvalidRequest(
                f"{', '.join(self.unresolved)} not set: resolve the request against its "
                "model's defaults first (with_model_defaults)"
            )
        return Params(w, h, steps, cfg, sampler)

    def size_and_steps(self) -> tuple[int, int, int]:
        """Width, height and steps (what the price and the limits look at), each given or
        resolved; InvalidRequest naming what is unset otherwise."""
        w, h, steps = self.width, self.height, self.steps
        if w is None or h is None or steps is None:
            raise InvalidRequest(
                f"{', '.join(self.unresolved)} not set: resolve the request against its "
                "model's defaults first (with_model_defaults)"
            )
        return w, h, steps

    def with_model_defaults(self, defaults: ModelDefaults) -> GenerationRequest:
        """A copy with every field not given (None) taken from the model's ``defaults``.

        A size given on one side only keeps the model's other side. Already resolved: itself.
        """
        missing = self.unresolved
        if not missing:
            return self
        return self.model_copy(update={f: getattr(defaults, f) for f in missing})

    @property
    def images_out(self) -> int:
        """How many images the job makes: ``count`` for each style (or one unstyled run)."""
        return self.count * max(1, len(self.styles))

    def with_seed(self, seed: int | None = None) -> GenerationRequest:
        """A copy with a concrete seed (a random one if the request had none)."""
        if self.seed is not None and seed is None:
            return self
        return self.model_copy(update={"seed": seed if seed is not None else new_seed()})

    def check_limits(self, limits: Limits, *, max_side: int | None = None) -> None:
        """Raise InvalidRequest if the request exceeds the deployment's or tier's limits."""
        side_cap = min(limits.max_side, max_side or limits.max_side)
        width, height, steps = self.size_and_steps()
        check_text_lengths(self.prompt, self.negative, limits)
        for name, v in (("width", width), ("height", height)):
            if not limits.min_side <= v <= side_cap:
                raise InvalidRequest(
                    f"{name} must be between {limits.min_side} and {side_cap}, got {v}"
                )
        if steps > limits.max_steps:
            raise InvalidRequest(f"steps must be at most {limits.max_steps}, got {steps}")
        if self.count > limits.max_count:
            raise InvalidRequest(f"count must be at most {limits.max_count}, got {self.count}")


def check_text_length(text: str, limit: int, *, what: str = "prompt") -> None:
    """PromptTooLong naming the limit and the length got when ``text`` is longer than
    ``limit`` characters. Done on the raw text first, where a prompt enters: normalising,
    the blocklist and token counting cost time in proportion to the length."""
    if len(text) > limit:
        raise PromptTooLong(f"{what} is {len(text)} characters; the limit is {limit}")


def check_text_lengths(prompt: str, negative: str, limits: Limits) -> None:
    """``check_text_length`` of a prompt and its negative against ``limits.max_prompt_chars``."""
    check_text_length(prompt, limits.max_prompt_chars, what="prompt")
    check_text_length(negative, limits.max_prompt_chars, what="negative prompt")


def new_seed() -> int:
    return secrets.randbelow(MAX_SEED + 1)


def build_request(**fields: object) -> GenerationRequest:
    """Construct a request, turning pydantic's errors into one InvalidRequest naming the field."""
    try:
        return GenerationRequest(**fields)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise invalid_from_validation(exc) from None


def invalid_from_validation(exc: ValidationError) -> InvalidRequest:
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "request"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{field}: {msg}")
    return InvalidRequest("; ".join(parts))
