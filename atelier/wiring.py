"""Helpers shared by the CLI commands: settings, one-line errors, quiet ML libraries. (The
processes and their parts are built in atelier/app.py.)"""

from __future__ import annotations

from typing import TypeVar

import typer
from rich.console import Console

from core.errors import AtelierError
from core.settings import Settings, load_settings

console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # errors stay one line, copyable


def settings_or_exit() -> Settings:
    """Settings, or a one-line error naming the bad variable and exit code 2."""
    try:
        return load_settings()
    except AtelierError as exc:
        err_console.print(f"[red]error:[/red] {exc.message}")
        raise typer.Exit(2) from None


def fail(exc: AtelierError) -> typer.Exit:
    """Print a user-facing error; the caller raises the returned Exit."""
    err_console.print(f"[red]error:[/red] {exc.message}")
    return typer.Exit(1)


def quiet_ml_libraries() -> None:
    """Silence progress bars and import chatter from diffusers/transformers on a CLI."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


R = TypeVar("R")


def recipe_from_options(recipe: R, steps: int | None, overrides: list[str] | None) -> R:
    """A training recipe (a frozen dataclass with ``max_steps`` and ``with_overrides``) with
    the ``--steps`` and ``--set field=value`` options of the train-demo commands applied; a bad
    ``--set`` is a usage error naming the option."""
    from dataclasses import replace

    if steps is not None:
        recipe = replace(recipe, max_steps=steps)  # type: ignore[type-var]
    try:
        return recipe.with_overrides(overrides or [])  # type: ignore[attr-defined, no-any-return]
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--set") from None
