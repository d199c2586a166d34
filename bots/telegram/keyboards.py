"""Inline keyboards: result buttons, the style picker, settings and history. Every button's
data comes from ``bots.common.buttons`` and names its owner."""

from __future__ import annotations

import math
from collections.abc import Sequence

from telegram import InlineKeyboardButton, InlineKeyboardMarkup

from bots.common.buttons import Action, button
from bots.common.prefs import ASPECTS, SIZES, STEPS, GroupPrefs, UserPrefs
from core.styles import StyleRegistry
from storage.jobs import JobRead

STYLES_PER_PAGE = 12
STYLES_PER_ROW = 3
NUMBERS_PER_ROW = 8  # Telegram shows at most 8 buttons in a row


def _b(text: str, data: str) -> InlineKeyboardButton:
    return InlineKeyboardButton(text, callback_data=data)


def _rows(items: Sequence[InlineKeyboardButton], per_row: int) -> list[list[InlineKeyboardButton]]:
    return [list(items[i : i + per_row]) for i in range(0, len(items), per_row)]


def results(job_id: str, owner: str, images: int) -> InlineKeyboardMarkup:
    """Reroll, another style, gallery; then V1..Vn and U1..Un."""
    rows = [
        [
            _b("🔄 Reroll", button(Action.reroll, owner, job_id)),
            _b("🎨 Style", button(Action.pick_style, owner, job_id)),
            _b("🖼 Gallery", button(Action.gallery, owner)),
        ]
    ]
    for action, letter in ((Action.variation, "V"), (Action.upscale, "U")):
        numbered = [
            _b(f"{letter}{n}", button(action, owner, job_id, n)) for n in range(1, images + 1)
        ]
        rows += _rows(numbered, NUMBERS_PER_ROW)
    return InlineKeyboardMarkup(rows)


def cancel(job_id: str, owner: str) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup([[_b("✖ Cancel", button(Action.cancel, owner, job_id))]])


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
) -> InlineKeyboardMarkup:
    """One page of the style picker: for the default style, or to re-run ``job_id``."""
    pages = style_pages(registry)
    page = min(max(page, 0), pages - 1)
    chosen = registry.all()[page * STYLES_PER_PAGE : (page + 1) * STYLES_PER_PAGE]
    pick, turn = (Action.set_style, Action.styles_page)
    if job_id is not None:
        pick, turn = (Action.restyle, Action.pick_style)
    items = [_b(s.label, button(pick, owner, job_id, style_arg(registry, s.name))) for s in chosen]
    rows = _rows(items, STYLES_PER_ROW)
    nav = []
    if page > 0:
        nav.append(_b("◀", button(turn, owner, job_id, page - 1)))
    if job_id is None:
        nav.append(_b("No style", button(Action.set_style, owner, None, "none")))
    if page < pages - 1:
        nav.append(_b("▶", button(turn, owner, job_id, page + 1)))
    rows.append(nav)
    return InlineKeyboardMarkup(rows)


def _mark(on: bool) -> str:
    return "✅" if on else "▫️"


def settings(prefs: UserPrefs, owner: str, *, private: bool) -> InlineKeyboardMarkup:
    """Personal defaults: aspect, size, steps, raw, original PNG and (privately) NSFW."""
    aspect = [
        _b(f"{'•' if prefs.aspect == a else ''}{a}", button(Action.setting, owner, None, f"ar={a}"))
        for a in ASPECTS
    ]
    size = [
        _b(
            f"{'•' if prefs.size == s else ''}{s.upper()} {side}",
            button(Action.setting, owner, None, f"size={s}"),
        )
        for s, side in SIZES.items()
    ]
    steps = [
        _b(
            f"{'•' if prefs.steps == n else ''}{n} steps",
            button(Action.setting, owner, None, f"steps={n}"),
        )
        for n in STEPS
    ]
    toggles = [
        _b(
            f"{_mark(prefs.raw)} Raw",
            button(Action.setting, owner, None, f"raw={int(not prefs.raw)}"),
        ),
        _b(
            f"{_mark(prefs.original)} PNG files",
            button(Action.setting, owner, None, f"original={int(not prefs.original)}"),
        ),
    ]
    if private:
        toggles.append(
            _b(
                f"{_mark(prefs.nsfw)} NSFW",
                button(Action.setting, owner, None, f"nsfw={int(not prefs.nsfw)}"),
            )
        )
    return InlineKeyboardMarkup([aspect, size, steps, toggles])


def group_settings(prefs: GroupPrefs) -> InlineKeyboardMarkup:
    """A group's settings; the buttons check that whoever presses is an admin."""
    return InlineKeyboardMarkup(
        [
            [
                _b(
                    f"{_mark(prefs.nsfw)} NSFW allowed",
                    button(Action.group_setting, None, None, f"nsfw={int(not prefs.nsfw)}"),
                )
            ],
            [
                _b(
                    f"{_mark(prefs.anyone_can_press)} Anyone may press result buttons",
                    button(
                        Action.group_setting,
                        None,
                        None,
                        f"anyone={int(not prefs.anyone_can_press)}",
                    ),
                )
            ],
        ]
    )


def history(jobs: Sequence[JobRead], owner: str) -> InlineKeyboardMarkup | None:
    if not jobs:
        return None
    items = [_b(f"🔄 {n}", button(Action.reroll, owner, j.id)) for n, j in enumerate(jobs, 1)]
    return InlineKeyboardMarkup(_rows(items, NUMBERS_PER_ROW))
