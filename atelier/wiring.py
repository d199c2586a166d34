"""Helpers shared by the CLI commands: settings, one-line errors, quiet ML libraries. (The
processes and their parts are built in atelier/app.py.)"""

from __future__ import annotations

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
