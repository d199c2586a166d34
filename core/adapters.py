"""Adapters a request asks for (LoRAs, by registry name and weight): the ``--lora name:0.8`` flag
value, A1111's ``<lora:name:0.8>`` prompt tags, and the limits both obey. Which names exist and
which model family each fits is the cluster's registry's business, checked at admission."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

from core.errors import InvalidRequest

MAX_ADAPTERS = 4
MIN_WEIGHT = -4.0
MAX_WEIGHT = 4.0
NAME_PATTERN = r"[a-z0-9][a-z0-9._-]*"
_NAME_RE = re.compile(NAME_PATTERN)
# A1111's prompt syntax: <lora:name> or <lora:name:weight> (its "extra networks" tag).
_TAG_RE = re.compile(r"<lora:([^:>]*)(?::([^:>]*))?>", re.IGNORECASE)
_WEIGHT_RE = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")


def _weight_text(w: float) -> str:
    number = float(w)
    return str(int(number)) if number.is_integer() else repr(number)


class AdapterRef(BaseModel):
    """One adapter as asked: its registry name and weight (None: the registry's default)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(max_length=64)
    weight: float | None = None

    @field_validator("name", mode="before")
    @classmethod
    def _name(cls, v: object) -> object:
        if isinstance(v, str):
            v = v.strip().lower()
            if not _NAME_RE.fullmatch(v):
                raise ValueError(
                    f"adapter name must be letters, digits, '.', '_' or '-', got {v!r}"
                )
        return v

    @field_validator("weight")
    @classmethod
    def _weight(cls, v: float | None) -> float | None:
        if v is not None and not MIN_WEIGHT <= v <= MAX_WEIGHT:
            raise ValueError(
                f"LoRA weight must be between {_weight_text(MIN_WEIGHT)} and "
                f"{_weight_text(MAX_WEIGHT)}, got {_weight_text(v)}"
            )
        return v

    def flag_value(self) -> str:
        """``name:w`` (``name`` alone with no weight), as ``--lora`` takes it."""
        return self.name if self.weight is None else f"{self.name}:{_weight_text(self.weight)}"

    def tag(self) -> str:
        """A1111's prompt tag for this adapter (weight 1 when none was resolved)."""
        return f"<lora:{self.name}:{_weight_text(1.0 if self.weight is None else self.weight)}>"


def _ref(name: str, weight: str | None, what: str) -> AdapterRef:
    name = name.strip().lower()
    if not _NAME_RE.fullmatch(name):
        raise InvalidRequest(f"{what}: expects a LoRA name like 'ink:0.8', got {name!r}")
    value: float | None = None
    if weight is not None and weight.strip():
        if not _WEIGHT_RE.fullmatch(weight.strip()):
            raise InvalidRequest(f"{what}: LoRA weight must be a number, got {weight.strip()!r}")
        value = float(weight)
    if value is not None and not MIN_WEIGHT <= value <= MAX_WEIGHT:
        raise InvalidRequest(
            f"{what}: LoRA weight must be between {_weight_text(MIN_WEIGHT)} and "
            f"{_weight_text(MAX_WEIGHT)}, got {_weight_text(value)}"
        )
    return AdapterRef(name=name, weight=value)


def parse_adapter(text: str, what: str = "--lora") -> AdapterRef:
    """``name`` or ``name:0.8`` (a flag value) as an AdapterRef; InvalidRequest naming it."""
    name, colon, weight = text.strip().partition(":")
    if not name:
        raise InvalidRequest(f"{what} needs a LoRA name, e.g. {what} ink:0.8")
    return _ref(name, weight if colon else None, what)


def extract_prompt_adapters(prompt: str) -> tuple[str, tuple[AdapterRef, ...]]:
    """The prompt without its ``<lora:name:w>`` tags, and those tags as AdapterRefs in order."""
    refs = [
        _ref(m.group(1), m.group(2), f"prompt tag {m.group(0)!r}")
        for m in _TAG_RE.finditer(prompt)
    ]
    if not refs:
        return prompt, ()
    cleaned = " ".join(_TAG_RE.sub(" ", prompt).split())
    return cleaned, tuple(refs)


def check_adapters(refs: tuple[AdapterRef, ...]) -> tuple[AdapterRef, ...]:
    """``refs`` if there are at most MAX_ADAPTERS, each named once; InvalidRequest otherwise."""
    seen: set[str] = set()
    for ref in refs:
        if ref.name in seen:
            raise InvalidRequest(f"LoRA {ref.name!r} is given twice; give each LoRA once")
        seen.add(ref.name)
    if len(refs) > MAX_ADAPTERS:
        raise InvalidRequest(f"at most {MAX_ADAPTERS} LoRAs per request, got {len(refs)}")
    return refs


def adapters_tags(refs: tuple[AdapterRef, ...]) -> str:
    """The A1111 tags of ``refs`` joined by spaces ("" for none)."""
    return " ".join(r.tag() for r in refs)
