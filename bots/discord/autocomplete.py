"""Autocomplete for styles (the style registry) and models (those a worker can load now)."""

from __future__ import annotations

from collections.abc import Sequence

from discord import app_commands

from core.styles import StyleRegistry

MAX_CHOICES = 25  # Discord's limit


def style_choices(registry: StyleRegistry, current: str) -> list[app_commands.Choice[str]]:
    """Styles whose name or label contains what was typed, best (prefix) matches first."""
    typed = current.strip().lower()
    styles = registry.all()
    hits = [s for s in styles if typed in s.name.lower() or typed in s.label.lower()]
    hits.sort(key=lambda s: (not s.name.lower().startswith(typed), s.name))
    return [app_commands.Choice(name=s.label[:100], value=s.name) for s in hits[:MAX_CHOICES]]


def model_choices(
    available: Sequence[str], current: str, *, with_default: bool = False
) -> list[app_commands.Choice[str]]:
    """Models a worker can load now (``Client.available_models``) whose name contains what was
    typed."""
    typed = current.strip().lower()
    names = [n for n in available if typed in n.lower()]
    choices = [app_commands.Choice(name=n, value=n) for n in names]
    if with_default and typed in "default":
        choices.insert(0, app_commands.Choice(name="default", value="default"))
    return choices[:MAX_CHOICES]
