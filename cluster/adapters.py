"""The adapter catalogue beside the model registry: named LoRAs, textual-inversion embeddings and
ControlNets (``[loras.NAME]`` / ``[embeddings.NAME]`` / ``[controlnets.NAME]`` in models.toml), the
model family each fits, and the admission checks that turn a request's adapter names into
resolved, fitting ones."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from core.adapters import MAX_WEIGHT, MIN_WEIGHT, AdapterRef
from core.errors import ConfigError, InvalidRequest

AdapterKind = Literal["lora", "embedding", "controlnet"]
ADAPTER_TABLES: dict[str, AdapterKind] = {
    "loras": "lora", "embeddings": "embedding", "controlnets": "controlnet",
}
ADAPTER_SUFFIXES = (".safetensors", ".bin", ".pt")


class AdapterSpec(BaseModel):
    """One adapter: ``file`` alone is a local file; with ``repo``, the file in that hub repo. A
    ControlNet's ``file`` is a Diffusers folder (``config.json`` + weights) or, with ``repo``,
    the repo itself (``file = "."``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$", max_length=64)
    kind: AdapterKind = "lora"
    description: str = ""
    repo: str | None = None
    file: str
    family: str
    # Only these models of the family (by registry name; empty: all of them), for weights
    # shaped for one model's UNet: the demo model's own LoRA and ControlNet.
    models: tuple[str, ...] = ()
    default_weight: float = Field(default=1.0, ge=MIN_WEIGHT, le=MAX_WEIGHT)
    # Words the adapter was trained on: added to the prompt of a request using it (each one
    # the prompt lacks), as people using A1111 type them by hand.
    triggers: tuple[str, ...] = ()
    token: str | None = None  # an embedding's prompt token (its name when unset)
    # A ControlNet's usual preprocessor (what a request naming none gets).
    preprocessor: Literal["canny", "scribble", "none"] | None = None

    @field_validator("file")
    @classmethod
    def _suffix(cls, v: str, info: ValidationInfo) -> str:
        if info.data.get("kind") == "controlnet":
            return v  # a folder
        if not v.endswith(ADAPTER_SUFFIXES):
            raise ValueError(f"must end in {', '.join(ADAPTER_SUFFIXES)}, got {v!r}")
        return v

    @model_validator(mode="after")
    def _token(self) -> AdapterSpec:
        if self.kind == "lora" and self.token is not None:
            raise ValueError("token is for embeddings; a LoRA is named by <lora:NAME:weight>")
        if self.kind == "embedding" and (self.repo is not None or "xl" in self.family):
            # SDXL embeddings hold a vector set per text encoder; hub files: not yet.
            raise ValueError("embeddings are local files for sd15 or sd-turbo models")
        if self.kind != "controlnet" and self.preprocessor is not None:
            raise ValueError("preprocessor is for controlnets")
        return self

    @property
    def source(self) -> Literal["repo", "file"]:
        return "repo" if self.repo is not None else "file"

    @property
    def location(self) -> str:
        return f"{self.repo}/{self.file}" if self.repo else self.file

    @property
    def prompt_token(self) -> str:
        return self.token or self.name

    def fits(self, family: str, model: str | None = None) -> bool:
        """Whether a model of ``family`` (named ``model``, where its ``models`` list matters)
        can take this adapter (turbo XL is SDXL-shaped)."""
        xl = {"sdxl", "sdxl-turbo"}
        if model is not None and self.models and model not in self.models:
            return False
        return family == self.family or (family in xl and self.family in xl)

    def misfit(self, family: str, model: str) -> str | None:
        """Why model ``model`` (of ``family``) cannot take this adapter, or None if it can."""
        what = {"lora": "LoRA", "embedding": "embedding", "controlnet": "ControlNet"}[self.kind]
        if self.models and model not in self.models:
            return (f"{what} {self.name!r} is for model {' or '.join(map(repr, self.models))} "
                    f"only; this job's model is {model!r}")
        if not self.fits(family):
            return f"{what} {self.name!r} is for {self.family} models; model {model!r} is {family}"
        return None

    def how_to_get(self) -> str:
        where = f"under [{self.kind}s.{self.name}] in your models.toml (ATELIER_MODELS_FILE)"
        if self.repo:
            return (f"run `huggingface-cli download {self.repo} {self.file}` on a box with "
                    f"network and copy its Hugging Face cache here, or set file {where} to a "
                    "downloaded copy (and drop repo)")
        return f"set file {where} to a .safetensors file that exists"


def parse_adapter_tables(
    doc: dict[str, Any], origin: str, base_dir: Path, data_dir: Path,
    families: tuple[str, ...],
) -> dict[str, dict[str, Any]]:
    """Raw adapter entries of one TOML doc by name, with local file paths resolved."""
    out: dict[str, dict[str, Any]] = {}
    for table, kind in ADAPTER_TABLES.items():
        entries = doc.get(table, {})
        if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
            raise ConfigError(f"{origin}: {table} must be tables, e.g. [{table}.NAME]")
        for name, entry in entries.items():
            raw = dict(entry) | {"kind": kind, "_origin": origin}
            if raw.get("family") not in families:
                raise ConfigError(
                    f"{origin}: {kind} {name!r}: family must be one of {', '.join(families)}, "
                    f"got {raw.get('family')!r}"
                )
            file = raw.get("file")
            if isinstance(file, str) and "repo" not in raw:
                p = Path(file.replace("{data_dir}", str(data_dir))).expanduser()
                raw["file"] = str(p if p.is_absolute() else base_dir / p)
            out[str(name)] = raw
    return out


def build_adapter(name: str, raw: dict[str, Any]) -> AdapterSpec:
    fields = {k: v for k, v in raw.items() if k != "_origin"}
    try:
        return AdapterSpec(**(fields | {"name": name}))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'entry'}: "
            f"{e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        )
        raise ConfigError(f"{raw.get('_origin')}: {raw.get('kind')} {name!r}: {problems}") from None


def unknown_adapter(name: str, known: list[str], what: str = "LoRA") -> InvalidRequest:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    available = ", ".join(known) or "none are installed"
    return InvalidRequest(f"unknown {what} {name!r}{hint}; available: {available}")


def resolve_controlnet(
    name: str, adapters: dict[str, AdapterSpec], *, model: str, family: str,
) -> AdapterSpec:
    """The ControlNet ``name`` after checking it exists and fits a ``family`` model;
    InvalidRequest naming the problem."""
    spec = adapters.get(name)
    if spec is None or spec.kind != "controlnet":
        known = [a.name for a in adapters.values() if a.kind == "controlnet"]
        raise unknown_adapter(name, known, "ControlNet")
    misfit = spec.misfit(family, model)
    if misfit is not None:
        raise InvalidRequest(misfit)
    return spec


def resolve_adapters(
    refs: tuple[AdapterRef, ...], adapters: dict[str, AdapterSpec], *, model: str, family: str,
) -> tuple[AdapterRef, ...]:
    """``refs`` with every weight set (the entry's default where none was given), after checking
    each names a LoRA that fits a ``family`` model; InvalidRequest naming the first misfit."""
    loras = [a.name for a in adapters.values() if a.kind == "lora"]
    out: list[AdapterRef] = []
    for ref in refs:
        spec = adapters.get(ref.name)
        if spec is None or spec.kind != "lora":
            raise unknown_adapter(ref.name, loras)
        misfit = spec.misfit(family, model)
        if misfit is not None:
            raise InvalidRequest(misfit)
        weight = spec.default_weight if ref.weight is None else ref.weight
        out.append(AdapterRef(name=ref.name, weight=weight))
    return tuple(out)


def add_triggers(
    prompt: str, refs: tuple[AdapterRef, ...], adapters: dict[str, AdapterSpec]
) -> str:
    """``prompt`` with the trigger words of the LoRAs in ``refs`` it does not contain yet
    (compared case-insensitively), appended comma-separated in ``refs`` order."""
    missing: list[str] = []
    lowered = prompt.casefold()
    for ref in refs:
        spec = adapters.get(ref.name)
        for word in spec.triggers if spec is not None else ():
            key = word.strip().casefold()
            if key and key not in lowered and word.strip() not in missing:
                missing.append(word.strip())
                lowered += f" {key}"
    return ", ".join([prompt.rstrip(", "), *missing]) if missing else prompt
