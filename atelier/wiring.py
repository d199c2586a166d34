"""Helpers shared by the CLI commands: settings, one-line errors, quiet ML libraries. (The
processes and their parts are built in atelier/app.py.)"""

from __future__ import annotations

from pathlib import Path
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


REPLACE_HELP = "write over the shipped folder under cluster/data (git checkout brings it back)"


def keep_shipped(target: Path, replace: bool) -> None:
    """A usage error, before any training, when ``target`` is one of the shipped folders
    (cluster/data/*) with files in it and ``--replace`` was not given: a run on a box without
    a GPU would put a far weaker model in place of the shipped one, which every new user's
    first picture comes from (28 min from scratch on 2 CPU cores reads 19% of kinds right,
    the shipped model 88%)."""
    from cluster.registry import PACKAGE_DATA_DIR

    target = target.resolve()
    if replace or target.parent != PACKAGE_DATA_DIR.resolve() or not target.is_dir():
        return
    if any(target.iterdir()):
        raise typer.BadParameter(
            f"{target} is a shipped folder; pass --out FOLDER to train one beside it (then "
            "point your models file at it), or --replace to write over it",
            param_hint="--out",
        )
