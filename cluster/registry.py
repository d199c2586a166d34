"""The model registry (named models from TOML) and the one place pipelines are loaded from disk
or the Hugging Face hub. Torch and Diffusers are imported only when a pipeline is loaded."""

from __future__ import annotations

import difflib
import logging
import tomllib
from collections.abc import Iterable, Iterator
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cluster.adapters import (
    ADAPTER_TABLES,
    AdapterSpec,
    build_adapter,
    parse_adapter_tables,
    resolve_adapters,
    resolve_controlnet,
)
from core.adapters import AdapterRef
from core.errors import AtelierError, ConfigError, InvalidRequest, ModelUnavailable
from core.request import GenerationRequest, ModelDefaults, canonical_scheduler
from core.settings import Settings, WorkerConfig

log = logging.getLogger(__name__)

MODELS_FILE_VARIABLE = "ATELIER_MODELS_FILE"
USER_MODELS_FILE = "models.toml"  # looked for in the data dir when no file is named
# The package's own data: models.toml and the demo model trained here (cluster/data/demo).
PACKAGE_DATA_DIR = Path(__file__).resolve().parent / "data"
DEMO_MODEL_DIR = PACKAGE_DATA_DIR / "demo"
DEMO_LORA_DIR = PACKAGE_DATA_DIR / "demo-lora"  # its LoRA (`atelier models train-demo-lora`)
SOURCE_KEYS = ("repo", "path", "file")
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


class Family(StrEnum):
    sd15 = "sd15"
    sdxl = "sdxl"
    sd_turbo = "sd-turbo"
    sdxl_turbo = "sdxl-turbo"

    @property
    def is_xl(self) -> bool:
        return self in (Family.sdxl, Family.sdxl_turbo)

    @property
    def pipeline_class(self) -> str:
        """The Diffusers text-to-image class a model of this family loads as."""
        return "StableDiffusionXLPipeline" if self.is_xl else "StableDiffusionPipeline"


# What an entry that leaves a field out gets. Turbo models are distilled for 1-4 steps without
# classifier-free guidance; SDXL's native size is 1024².
FAMILY_DEFAULTS: dict[Family, dict[str, Any]] = {
    Family.sd15: {
        "min_vram_gb": 4, "default_width": 512, "default_height": 512, "max_width": 1024,
        "max_height": 1024, "default_steps": 25, "max_steps": 60, "scheduler": "Euler a",
        "guidance": 7.0,
    },
    Family.sdxl: {
        "min_vram_gb": 8, "default_width": 1024, "default_height": 1024, "max_width": 1536,
        "max_height": 1536, "default_steps": 30, "max_steps": 60, "scheduler": "Euler a",
        "guidance": 6.0,
    },
    Family.sd_turbo: {
        "min_vram_gb": 4, "default_width": 512, "default_height": 512, "max_width": 768,
        "max_height": 768, "default_steps": 1, "max_steps": 4, "scheduler": "Euler a",
        "guidance": 0.0,
    },
    Family.sdxl_turbo: {
        "min_vram_gb": 8, "default_width": 512, "default_height": 512, "max_width": 1024,
        "max_height": 1024, "default_steps": 1, "max_steps": 4, "scheduler": "Euler a",
        "guidance": 0.0,
    },
}

# Parameter counts of the published models (UNet + VAE + text encoders): a size estimate for a
# model before it is loaded the first time.
FAMILY_PARAMS: dict[Family, int] = {
    Family.sd15: 1_066_000_000,
    Family.sdxl: 3_469_000_000,
    Family.sd_turbo: 1_304_000_000,
    Family.sdxl_turbo: 3_469_000_000,
}


class ModelLoadError(AtelierError):
    """A model could not be loaded; the message names it, the cause and what to do."""

    code = "model_load_error"

    def __init__(self, model: str, message: str) -> None:
        super().__init__(message)
        self.model = model


class ModelSpec(BaseModel):
    """One registry entry. Exactly one of ``repo``, ``path`` or ``file`` says where it lives."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$", max_length=64)
    description: str = ""
    repo: str | None = None
    path: Path | None = None
    file: Path | None = None
    config: str | None = None  # component configs for a single-file checkpoint
    family: Family
    variant: str | None = None
    min_vram_gb: float = Field(ge=0)
    default_width: int = Field(ge=64)
    default_height: int = Field(ge=64)
    max_width: int = Field(ge=64)
    max_height: int = Field(ge=64)
    default_steps: int = Field(ge=1, le=150)
    max_steps: int = Field(ge=1, le=150)
    scheduler: str
    guidance: float = Field(ge=0, le=30)
    compile: bool = False
    quantize: Literal["int8", "fp8"] | None = None  # fp8: CUDA sm89+ only (the profile says)
    fast: bool = False
    # Off by default: prompts are screened by the blocklist, and the checker costs ~1 GB.
    safety_checker: bool = False
    hint: str | None = None  # shown when the model cannot be loaded

    @field_validator("scheduler")
    @classmethod
    def _scheduler(cls, v: str) -> str:
        try:
            return canonical_scheduler(v)
        except InvalidRequest as exc:
            raise ValueError(exc.message) from None

    @field_validator("default_width", "default_height", "max_width", "max_height")
    @classmethod
    def _multiple_of_8(cls, v: int) -> int:
        if v % 8:
            raise ValueError(f"must be a multiple of 8, got {v}")
        return v

    @field_validator("file")
    @classmethod
    def _checkpoint_suffix(cls, v: Path | None) -> Path | None:
        if v is not None and v.suffix not in CHECKPOINT_SUFFIXES:
            raise ValueError(f"must end in {' or '.join(CHECKPOINT_SUFFIXES)}, got {v.name!r}")
        return v

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        given = [k for k in SOURCE_KEYS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"set exactly one of repo, path or file (got {given or 'none'})")
        for side in ("width", "height"):
            default, top = getattr(self, f"default_{side}"), getattr(self, f"max_{side}")
            if default > top:
                raise ValueError(f"default_{side} {default} exceeds max_{side} {top}")
        if self.default_steps > self.max_steps:
            raise ValueError(
                f"default_steps {self.default_steps} exceeds max_steps {self.max_steps}"
            )
        return self

    @property
    def source(self) -> Literal["repo", "path", "file"]:
        if self.repo is not None:
            return "repo"
        return "path" if self.path is not None else "file"

    @property
    def location(self) -> str:
        return str(self.repo or self.path or self.file)

    @property
    def defaults(self) -> ModelDefaults:
        """What a request that leaves size, steps, guidance or scheduler out gets."""
        return ModelDefaults(
            width=self.default_width, height=self.default_height, steps=self.default_steps,
            guidance=self.guidance, scheduler=self.scheduler,
        )

    @property
    def estimated_params(self) -> int:
        return FAMILY_PARAMS[self.family]


# Reading TOML ---------------------------------------------------------------------------------


def _read_toml(path: Path, what: str) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{what} {path} is not valid TOML: {exc}") from None


def _raw_entries(doc: dict[str, Any], origin: str) -> dict[str, dict[str, Any]]:
    models = doc.get("models", {})
    unknown = sorted(set(doc) - {"models", "default", "fallback", *ADAPTER_TABLES})
    if unknown:
        raise ConfigError(f"{origin}: unknown top-level keys {unknown}; expected [models.NAME]")
    if not isinstance(models, dict) or not all(isinstance(v, dict) for v in models.values()):
        raise ConfigError(f"{origin}: models must be tables, e.g. [models.sd15]")
    return {str(name): dict(entry) for name, entry in models.items()}


def _expand(value: str, base_dir: Path, data_dir: Path) -> Path:
    p = Path(value.replace("{data_dir}", str(data_dir))).expanduser()
    return p if p.is_absolute() else base_dir / p


def _prepare(raw: dict[str, Any], base_dir: Path, data_dir: Path) -> dict[str, Any]:
    out = dict(raw)
    for key in ("path", "file"):
        if isinstance(out.get(key), str):
            out[key] = _expand(out[key], base_dir, data_dir)
    config = out.get("config")
    # A config written like a path is one (resolved like path/file); anything else is a repo id.
    if isinstance(config, str) and config.startswith(("/", ".", "~", "{data_dir}")):
        out["config"] = str(_expand(config, base_dir, data_dir))
    return out


def _build_spec(name: str, raw: dict[str, Any], origin: str) -> ModelSpec:
    try:
        family = Family(raw.get("family", ""))
    except ValueError:
        choices = ", ".join(f.value for f in Family)
        raise ConfigError(
            f"{origin}: model {name!r}: family must be one of {choices}, got {raw.get('family')!r}"
        ) from None
    try:
        return ModelSpec(**(FAMILY_DEFAULTS[family] | raw | {"name": name}))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'entry'}: "
            f"{e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        raise ConfigError(f"{origin}: model {name!r}: {problems}") from None


def _merge(base: dict[str, Any] | None, override: dict[str, Any]) -> dict[str, Any]:
    """A user's entry over a packaged one: only what the user sets changes. A new source
    replaces the old one along with its ``variant`` and ``config``, which belong to it."""
    if base is None:
        return override
    merged = dict(base)
    if any(k in override for k in SOURCE_KEYS):
        for k in (*SOURCE_KEYS, "variant", "config"):
            merged.pop(k, None)
    merged.update(override)
    return merged


class ModelRegistry:
    """Named models. ``get`` resolves a request's model name (or the default)."""

    def __init__(
        self, specs: Iterable[ModelSpec], default: str | None = None, *,
        fallback: str | None = None, adapters: Iterable[AdapterSpec] = (),
    ) -> None:
        self._specs: dict[str, ModelSpec] = {s.name: s for s in specs}
        self.adapters: dict[str, AdapterSpec] = {a.name: a for a in adapters}
        if not self._specs:
            raise ConfigError("the model registry is empty")
        self._default = default if default is not None else next(iter(self._specs))
        for what, name in (("default", self._default), ("fallback", fallback)):
            if name is not None and name not in self._specs:
                raise ConfigError(
                    f"{what} model {name!r} is not in the registry; "
                    f"available: {', '.join(self._specs)}"
                )
        self._fallback = fallback
        for adapter in self.adapters.values():
            unknown = [m for m in adapter.models if m not in self._specs]
            if unknown:
                raise ConfigError(
                    f"{adapter.kind} {adapter.name!r}: models names {', '.join(unknown)}, not in "
                    f"the registry; available: {', '.join(self._specs)}"
                )

    @property
    def fallback(self) -> str | None:
        """The model a request naming none gets when the default is not available (the demo
        model, trained here, shipped in the package)."""
        return self._fallback

    @classmethod
    def load(
        cls, settings: Settings | WorkerConfig, extra_path: Path | str | None = None
    ) -> ModelRegistry:
        """The packaged models, overridden/extended by the user's file.

        The user's file is ``extra_path``, else ``settings.models_file`` (ATELIER_MODELS_FILE)
        where Settings has it, else ``{data_dir}/models.toml`` when that exists.
        """
        data_dir = Path(settings.data_dir)
        packaged = resources.files("cluster") / "data" / "models.toml"
        doc = tomllib.loads(packaged.read_text("utf-8"))
        # A relative path in the packaged file is in the package (the shipped demo model).
        raw = {
            n: _prepare(e, PACKAGE_DATA_DIR, data_dir)
            for n, e in _raw_entries(doc, "packaged models.toml").items()
        }
        origins = dict.fromkeys(raw, "packaged models.toml")
        families = tuple(f.value for f in Family)
        adapters = parse_adapter_tables(
            doc, "packaged models.toml", PACKAGE_DATA_DIR, data_dir, families
        )
        default = doc.get("default")
        fallback = doc.get("fallback")

        user_path: Path | None = None
        named = extra_path if extra_path is not None else settings.models_file
        if named is not None:
            user_path = Path(named).expanduser()
        elif (data_dir / USER_MODELS_FILE).is_file():
            user_path = data_dir / USER_MODELS_FILE
        if user_path is not None:
            user_doc = _read_toml(user_path, f"models file ({MODELS_FILE_VARIABLE})")
            origin = str(user_path)
            for name, entry in _raw_entries(user_doc, origin).items():
                raw[name] = _merge(raw.get(name), _prepare(entry, user_path.parent, data_dir))
                origins[name] = origin
            adapters |= parse_adapter_tables(
                user_doc, origin, user_path.parent, data_dir, families
            )
            default = user_doc.get("default", default)
            fallback = user_doc.get("fallback", fallback)

        specs = [_build_spec(n, e, origins[n]) for n, e in raw.items()]
        built = [build_adapter(n, e) for n, e in adapters.items()]
        return cls(specs, default, fallback=fallback or None, adapters=built)

    @property
    def default(self) -> str:
        return self._default

    def get(self, name: str | None = None) -> ModelSpec:
        """The spec named ``name`` (the default when None); InvalidRequest if unknown."""
        if name is None:
            return self._specs[self._default]
        spec = self._specs.get(name) or self._specs.get(name.strip().lower())
        if spec is not None:
            return spec
        available = ", ".join(self._specs)
        close = difflib.get_close_matches(name.strip().lower(), list(self._specs), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise InvalidRequest(f"unknown model {name!r}{hint}; available: {available}")

    def resolve_adapters(
        self, refs: tuple[AdapterRef, ...], model: str | None = None
    ) -> tuple[AdapterRef, ...]:
        """``refs`` checked against the adapter catalogue for ``model`` (names known, family
        fits) with default weights filled in; InvalidRequest naming the first problem."""
        spec = self.get(model)
        return resolve_adapters(refs, self.adapters, model=spec.name, family=spec.family.value)

    def resolve_control(self, request: GenerationRequest) -> GenerationRequest:
        """``request`` with its ControlNet unit checked against the catalogue (known, fits the
        model's family) and the ControlNet's own preprocessor where the unit names none."""
        unit = request.control
        if unit is None:
            return request
        spec = self.get(request.model)
        family = spec.family.value
        name = unit.controlnet
        if name is None:  # the one for this preprocessor and family
            # One made for this very model first (the demo's), then any of its family.
            fitting = sorted(
                (a for a in self.adapters.values()
                 if a.kind == "controlnet" and a.fits(family, spec.name)
                 and a.preprocessor == unit.preprocessor),
                key=lambda a: spec.name not in a.models,
            )
            if not fitting:
                raise InvalidRequest(
                    f"no ControlNet for {unit.preprocessor} fits model {spec.name!r} ({family}); "
                    "name one with its catalogue name"
                )
            name = fitting[0].name
        cn = resolve_controlnet(name, self.adapters, model=spec.name, family=family)
        unit = unit.model_copy(update={"controlnet": cn.name})
        if unit.preprocessor is None and cn.preprocessor is not None:
            unit = unit.model_copy(update={"preprocessor": cn.preprocessor})
        return request.model_copy(update={"control": unit})

    def all(self) -> list[ModelSpec]:
        return list(self._specs.values())

    def names(self) -> list[str]:
        return list(self._specs)

    def with_models(self, *specs: ModelSpec, default: str | None = None) -> ModelRegistry:
        """A copy with ``specs`` added or replaced by name (handy in tests and tools)."""
        merged = self._specs | {s.name: s for s in specs}
        return ModelRegistry(
            merged.values(), default or self._default, adapters=self.adapters.values()
        )

    def with_adapters(self, *adapters: AdapterSpec) -> ModelRegistry:
        """A copy with ``adapters`` added or replaced by name (tests and tools)."""
        merged = self.adapters | {a.name: a for a in adapters}
        return ModelRegistry(
            self._specs.values(), self._default, fallback=self._fallback,
            adapters=merged.values(),
        )

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)


# The hub cache (what cluster/availability.py asks too) -----------------------------------------


def hub_cached(repo: str, filename: str = "model_index.json") -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo, filename), str)


# Loading -------------------------------------------------------------------------------------


def cause_of(exc: BaseException, limit: int = 240) -> str:
    text = " ".join(str(exc).split()).rstrip(".") or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def where_to_set(spec: ModelSpec) -> str:
    return f"under [models.{spec.name}] in your models.toml ({MODELS_FILE_VARIABLE})"


def fix_download(spec: ModelSpec) -> str:
    return f'Download it elsewhere and set path = "/models/{spec.name}" {where_to_set(spec)}'


def fix_location(spec: ModelSpec) -> str:
    return (
        "Point path (a Diffusers folder) or file (a .safetensors/.ckpt checkpoint) "
        f"{where_to_set(spec)} at a copy that exists"
    )


def fix_broken(spec: ModelSpec) -> str:
    return (
        "The files may be incomplete or corrupt: fetch them again, or point path "
        f"{where_to_set(spec)} at a good copy"
    )


def settable(spec: ModelSpec, what: str) -> str:
    return f"set {what} under [models.{spec.name}] in your models.toml ({MODELS_FILE_VARIABLE})"


def how_to_get(spec: ModelSpec) -> str:
    """One line on how to make ``spec`` available (no server path: a person may read it)."""
    if spec.source == "repo":
        fix = (f"run `huggingface-cli download {spec.repo}` on a box with network and copy its "
               f"Hugging Face cache here, or {settable(spec, 'path to a downloaded copy')}")
    elif spec.source == "path":
        fix = settable(spec, "path to a Diffusers folder that exists")
    else:
        fix = settable(spec, "file to a .safetensors/.ckpt checkpoint that exists")
    if spec.hint:  # a model's own remedy (how the tiny models are built) comes first
        fix = f"{spec.hint}, or {fix}"
    return fix


def unavailable(
    spec: ModelSpec, why: str, operator_why: str, fix: str, how: str | None = None
) -> ModelUnavailable:
    """A load failure no retry can mend: the person's line (``why``, how to get it) and the
    operator's (``operator_why`` with paths, and the fix) as its detail."""
    return ModelUnavailable(
        f"model '{spec.name}' is not available: {why}. To get it: {how or how_to_get(spec)}",
        detail=load_failure(spec, operator_why, fix).message, model=spec.name,
    )


def lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def load_failure(spec: ModelSpec, why: str, fix: str) -> ModelLoadError:
    if spec.hint:  # a model's own remedy (e.g. how the tiny models are built) comes first
        fix = f"{spec.hint[0].upper()}{spec.hint[1:]}, or {lower_first(fix)}"
    return ModelLoadError(spec.name, f"model '{spec.name}' could not be loaded: {why}. {fix}")
