"""``/imagine``'s typed options as the chat flag syntax (``core.flags``), so a Discord request
and a Telegram one go through the same parser: ``prompt:"a fox" aspect:16:9 n:2`` is
``a fox --ar 16:9 --n 2``. Flags typed inside ``prompt`` work too."""

from __future__ import annotations

from dataclasses import dataclass, fields

from core.errors import InvalidRequest

# A value may not start a flag of its own ("--no a --seed 3" would set a seed).
_DASHES = ("--", "\u2014", "\u2013")


@dataclass(frozen=True, slots=True)
class Options:
    """What the person filled in besides the prompt (None: not given)."""

    style: str | None = None
    aspect: str | None = None
    n: int | None = None
    seed: int | None = None
    steps: int | None = None
    cfg: float | None = None
    negative: str | None = None
    model: str | None = None
    strength: float | None = None


_FLAGS = {
    "style": "style",
    "aspect": "ar",
    "n": "n",
    "seed": "seed",
    "steps": "steps",
    "cfg": "cfg",
    "negative": "no",
    "model": "model",
    "strength": "strength",
}


def command_text(prompt: str, options: Options) -> str:
    """The prompt followed by one flag per option given."""
    parts = [prompt.strip()]
    for f in fields(options):
        value = getattr(options, f.name)
        if value is None:
            continue
        text = _number(value) if isinstance(value, float) else str(value).strip()
        if any(dash in text for dash in _DASHES):
            raise InvalidRequest(f"{f.name} must not contain '--', got {text!r}")
        if text:
            parts.append(f"--{_FLAGS[f.name]} {text}")
    return " ".join(parts)


def _number(x: float) -> str:
    return repr(float(x)).removesuffix(".0")
