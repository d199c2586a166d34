"""Platform-free keyboards: rows of (label, button data) that each adapter renders natively
(Telegram inline keyboards, Discord buttons). A row is a logical group; an adapter splits a row
that is longer than its platform allows (Telegram 8 a row, Discord 5)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from bots.common.buttons import Action, button
from bots.common.prefs import ASPECTS, SIZES, STEPS, GroupPrefs, UserPrefs
from core.styles import StyleRegistry
from storage.jobs import JobRead

STYLES_PER_PAGE = 12
STYLES_PER_ROW = 3
VARY_REGION = "🖌 Vary (Region)"


@dataclass(frozen=True, slots=True)
class Key:
    """One button: what it shows and its data (``bots.common.buttons``, <= 64 bytes)."""

    label: str
    data: str


Row = tuple[Key, ...]
Keyboard = tuple[Row, ...]


def _rows(items: Sequence[Key], per_row: int) -> list[Row]:
    return [tuple(items[i : i + per_row]) for i in range(0, len(items), per_row)]


def results(
    job_id: str, owner: str, images: int, *, upscale: Sequence[int] | None = None
) -> Keyboard:
    """Reroll, another style, gallery; then V1..Vn and U1..Un (U only for the image numbers in
    ``upscale`` when given: those an upscale fits); then Vary (Region) of each image."""
    numbers = range(1, images + 1)
    ups = [n for n in numbers if upscale is None or n in upscale]
    rows: list[Row] = [
        (
            Key("🔄 Reroll", button(Action.reroll, owner, job_id)),
            Key("🎨 Style", button(Action.pick_style, owner, job_id)),
            Key("🖼 Gallery", button(Action.gallery, owner)),
        ),
        tuple(Key(f"V{n}", button(Action.variation, owner, job_id, n)) for n in numbers),
    ]
    if ups:
        rows.append(tuple(Key(f"U{n}", button(Action.upscale, owner, job_id, n)) for n in ups))
    rows.append(tuple(
        Key(VARY_REGION if images == 1 else f"🖌 Region {n}",
            button(Action.vary_region, owner, job_id, n))
        for n in numbers
    ))
    return tuple(rows)


def grid_sheet(owner: str) -> Keyboard:
    """Under a grid's contact sheet: the gallery, where every cell is (each with its own
    buttons there: make again, variations)."""
    return ((Key("🖼 Gallery", button(Action.gallery, owner)),),)


def cancel(job_id: str, owner: str) -> Keyboard:
    return ((Key("✖ Cancel", button(Action.cancel, owner, job_id)),),)


def cancel_grid(first_cell: str, owner: str) -> Keyboard:
    """Under a grid's status while cells are queued or running."""
    return ((Key("✖ Cancel grid", button(Action.cancel_grid, owner, first_cell)),),)


def style_pages(registry: StyleRegistry) -> int:
    return max(1, math.ceil(len(registry) / STYLES_PER_PAGE))


def style_arg(registry: StyleRegistry, name: str) -> str:
    """A style by name, or by ``#index`` when the name would not fit the button data."""
    return name if len(name) <= 20 else f"#{registry.names().index(name)}"


def style_from_arg(registry: StyleRegistry, arg: str) -> str:
    if arg.startswith("#") and arg[1:].isdigit():
        names = registry.names()
        index = int(arg[1:])
        return names[index] if index < len(names) else arg
    return arg


def styles(
    registry: StyleRegistry, page: int, owner: str, *, job_id: str | None = None
) -> Keyboard:
    """One page of the style picker: for the default style, or to re-run ``job_id``."""
    pages = style_pages(registry)
    page = min(max(page, 0), pages - 1)
    chosen = registry.all()[page * STYLES_PER_PAGE : (page + 1) * STYLES_PER_PAGE]
    pick, turn = (Action.set_style, Action.styles_page)
    if job_id is not None:
        pick, turn = (Action.restyle, Action.pick_style)
    items = [Key(s.label, button(pick, owner, job_id, style_arg(registry, s.name))) for s in chosen]
    rows = _rows(items, STYLES_PER_ROW)
    nav: list[Key] = []
    if page > 0:
        nav.append(Key("◀", button(turn, owner, job_id, page - 1)))
    if job_id is None:
        nav.append(Key("No style", button(Action.set_style, owner, None, "none")))
    if page < pages - 1:
        nav.append(Key("▶", button(turn, owner, job_id, page + 1)))
    rows.append(tuple(nav))
    return tuple(rows)


def _mark(on: bool) -> str:
    return "✅" if on else "▫️"


def _setting(owner: str, label: str, arg: str) -> Key:
    return Key(label, button(Action.setting, owner, None, arg))


def settings(prefs: UserPrefs, owner: str, *, private: bool) -> Keyboard:
    """Personal defaults: aspect, size, steps, raw, original PNG and (privately) NSFW."""
    dot = "•"
    aspect = tuple(
        _setting(owner, f"{dot if prefs.aspect == a else ''}{a}", f"ar={a}") for a in ASPECTS
    )
    size = tuple(
        _setting(owner, f"{dot if prefs.size == s else ''}{s.upper()} {side}", f"size={s}")
        for s, side in SIZES.items()
    )
    steps = tuple(
        _setting(owner, f"{dot if prefs.steps == n else ''}{n} steps", f"steps={n}") for n in STEPS
    )
    toggles = [
        _setting(owner, f"{_mark(prefs.raw)} Raw", f"raw={int(not prefs.raw)}"),
        _setting(
            owner, f"{_mark(prefs.original)} PNG files", f"original={int(not prefs.original)}"
        ),
    ]
    if private:
        toggles.append(_setting(owner, f"{_mark(prefs.nsfw)} NSFW", f"nsfw={int(not prefs.nsfw)}"))
    return (aspect, size, steps, tuple(toggles))


def group_settings(prefs: GroupPrefs) -> Keyboard:
    """A group's settings; the buttons check that whoever presses is an admin."""
    nsfw = button(Action.group_setting, None, None, f"nsfw={int(not prefs.nsfw)}")
    anyone = button(Action.group_setting, None, None, f"anyone={int(not prefs.anyone_can_press)}")
    return (
        (Key(f"{_mark(prefs.nsfw)} NSFW allowed", nsfw),),
        (Key(f"{_mark(prefs.anyone_can_press)} Anyone may press result buttons", anyone),),
    )


def history(jobs: Sequence[JobRead], owner: str) -> Keyboard | None:
    if not jobs:
        return None
    return (
        tuple(Key(f"🔄 {n}", button(Action.reroll, owner, j.id)) for n, j in enumerate(jobs, 1)),
    )


def imagine(owner: str, draft_id: str) -> Keyboard:
    """Under a preview of plain text: make it."""
    return ((Key("🎨 Imagine", button(Action.imagine, owner, None, draft_id)),),)
