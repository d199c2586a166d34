"""The styles registry: named prompt templates (``--style watercolor``) loaded from TOML.

The curated set ships as ``core/data/styles.toml``; a deployment may load its own file.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Iterable, Mapping
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from core.adapters import AdapterRef
from core.errors import ConfigError, InvalidRequest

PROMPT_SLOT = "{prompt}"
_NAME_RE = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
# "none" clears the styles in flag syntax (``--style none``), so no style may be called that.
RESERVED_NAMES = frozenset({"none"})


def term_key(term: str) -> str:
    """Compare comma-separated terms loosely: "Low-res" and "lowres" are the same term."""
    key = re.sub(r"[\W_]+", "", term.casefold())
    return key or term.casefold().strip()


def split_terms(text: str) -> list[str]:
    """The non-empty, stripped comma-separated terms of a prompt fragment."""
    return [t.strip() for t in text.split(",") if t.strip()]


def merge_terms(*parts: str) -> str:
    """Join comma-separated fragments, keeping the first of duplicate terms and no empty ones."""
    seen: set[str] = set()
    out: list[str] = []
    for part in parts:
        for term in split_terms(part):
            key = term_key(term)
            if key not in seen:
                seen.add(key)
                out.append(term)
    return ", ".join(out)


def style_key(name: str) -> str:
    """How a typed style name is looked up: "Oil Painting" and "oil_painting" -> "oil-painting"."""
    return re.sub(r"[\s_]+", "-", name.strip().lower())


class Style(BaseModel):
    """One style: a template around the user's prompt, a negative, and optional defaults."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    label: str
    prompt: str
    negative: str = ""
    # Defaults a style may suggest; the user's own settings and explicit flags win over them.
    steps: int | None = Field(default=None, ge=1, le=150)
    guidance: float | None = Field(default=None, ge=0.0, le=30.0)
    width: int | None = None
    height: int | None = None
    # LoRAs the style applies, registry name -> weight (checked against the registry at admission).
    loras: dict[str, float] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME_RE.match(v) or v in RESERVED_NAMES:
            raise ValueError(f"style names are lower-case words joined by '-', got {v!r}")
        return v

    @field_validator("prompt")
    @classmethod
    def _template(cls, v: str) -> str:
        if v.count(PROMPT_SLOT) != 1:
            raise ValueError(f"the template must contain {PROMPT_SLOT} exactly once, got {v!r}")
        return v

    @field_validator("width", "height")
    @classmethod
    def _side(cls, v: int | None) -> int | None:
        if v is not None and (v % 8 != 0 or v < 64):
            raise ValueError(f"must be a multiple of 8 and at least 64, got {v}")
        return v

    def apply(self, prompt: str, negative: str = "") -> tuple[str, str]:
        """The styled prompt and the negative: the style's terms, then the user's, deduplicated."""
        # str.replace rather than format(): the user's text may contain braces.
        styled = self.prompt.replace(PROMPT_SLOT, prompt.strip())
        return styled, merge_terms(self.negative, negative)

    @field_validator("loras")
    @classmethod
    def _loras(cls, v: dict[str, float]) -> dict[str, float]:
        for name, weight in v.items():
            try:
                AdapterRef(name=name, weight=weight)
            except ValidationError as exc:
                raise ValueError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None
        return v

    def adapters(self) -> tuple[AdapterRef, ...]:
        """The LoRAs this style applies, in the order the styles file lists them."""
        return tuple(AdapterRef(name=n, weight=w) for n, w in self.loras.items())

    def params(self) -> dict[str, Any]:
        """The request fields this style sets by default (only those it defines)."""
        fields = ("steps", "guidance", "width", "height")
        return {f: getattr(self, f) for f in fields if getattr(self, f) is not None}


class StyleRegistry:
    """The styles a deployment offers, by name."""

    def __init__(self, styles: Iterable[Style]) -> None:
        self._styles: dict[str, Style] = {}
        for style in styles:
            if style.name in self._styles:
                raise ConfigError(f"style {style.name!r} is defined twice")
            self._styles[style.name] = style

    @classmethod
    def load(cls, path: str | Path | None = None) -> StyleRegistry:
        """Read a styles TOML file (one table per style); the shipped set when ``path`` is None."""
        if path is None:
            source = "core/data/styles.toml"
            text = resources.files("core").joinpath("data/styles.toml").read_text("utf-8")
        else:
            source = str(path)
            try:
                text = Path(path).read_text("utf-8")
            except OSError as exc:
                raise ConfigError(f"cannot read styles file {source}: {exc.strerror}") from None
        return cls.from_toml(text, source=source)

    @classmethod
    def from_toml(cls, text: str, *, source: str = "<styles>") -> StyleRegistry:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: invalid TOML: {exc}") from None
        return cls.from_mapping(data, source=source)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str = "<styles>") -> StyleRegistry:
        styles = []
        for name, table in data.items():
            if not isinstance(table, Mapping):
                raise ConfigError(f"{source}: [{name}] must be a table, got {table!r}")
            try:
                styles.append(Style(name=name, **table))
            except ValidationError as exc:
                problems = "; ".join(
                    f"{'.'.join(str(p) for p in e['loc']) or 'style'}: "
                    + e["msg"].removeprefix("Value error, ")
                    for e in exc.errors()
                )
                raise ConfigError(f"{source}: style [{name}]: {problems}") from None
        return cls(styles)

    def get(self, name: str) -> Style:
        """The style called ``name`` (loosely spelled), or InvalidRequest with a suggestion."""
        key = style_key(name)
        style = self._styles.get(key)
        if style is not None:
            return style
        close = difflib.get_close_matches(key, list(self._styles), n=1, cutoff=0.6)
        if close:
            raise InvalidRequest(f"unknown style {name.strip()!r}; did you mean {close[0]!r}?")
        raise InvalidRequest(
            f"unknown style {name.strip()!r}; available styles: {', '.join(self.names())}"
        )

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and style_key(name) in self._styles

    def __len__(self) -> int:
        return len(self._styles)

    def names(self) -> list[str]:
        return list(self._styles)

    def all(self) -> list[Style]:
        return list(self._styles.values())


@cache
def default_registry() -> StyleRegistry:
    """The shipped styles, read once per process."""
    return StyleRegistry.load()
