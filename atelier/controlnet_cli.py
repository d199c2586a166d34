"""``atelier models train-demo-controlnet``: trains the demo model's Canny ControlNet on this
machine's CPU (engine/demo/controlnet.py), the one shipped as ``demo-canny``."""

from __future__ import annotations

import typer

from atelier.wiring import (
    REPLACE_HELP,
    console,
    keep_shipped,
    quiet_ml_libraries,
    recipe_from_options,
)


def train_demo_controlnet(
    out: str | None = typer.Option(
        None, help="where to save it; default: cluster/data/demo-canny, the shipped one "
        "(with --replace)"
    ),
    minutes: float = typer.Option(14.0, help="wall-clock budget for the whole training"),
    seed: int = typer.Option(0, help="the seed of the scenes and the weights"),
    threads: int = typer.Option(1, help="torch threads (1 leaves the other cores to others)"),
    steps: int | None = typer.Option(None, help="stop after this many steps"),
    base: str | None = typer.Option(
        None, help="the demo model folder to copy and freeze; default: the shipped one"
    ),
    check: int = typer.Option(32, help="held-out scenes to measure it on afterwards (0: none)"),
    overrides: list[str] | None = typer.Option(
        None, "--set", help="a recipe field, e.g. --set lr=5e-4 --set misplaced=0.3 "
        "(see ControlRecipe)"
    ),
    replace: bool = typer.Option(False, "--replace", help=REPLACE_HELP),
) -> None:
    """Train the demo ControlNet: the demo model's scenes, each with its Canny edge map, teach a
    copy of its UNet to put shapes where the edges are (`--model demo --control canny`)."""
    from pathlib import Path

    from engine.demo.controlnet import DEMO_CONTROLNET_DIR, ControlRecipe, train_demo_controlnet

    quiet_ml_libraries()
    target = Path(out) if out else DEMO_CONTROLNET_DIR
    keep_shipped(target, replace)
    recipe = ControlRecipe(seed=seed, minutes=minutes, threads=threads, base=base)
    recipe = recipe_from_options(recipe, steps, overrides)
    if recipe.base is not None and not (Path(recipe.base) / "unet").is_dir():
        raise typer.BadParameter(f"{recipe.base} is not a demo model folder (no unet/ in it)",
                                 param_hint="--base")
    record = train_demo_controlnet(target, recipe, progress=console.print, check=check)
    console.print(f"demo ControlNet: {target} ({record['steps']} steps in {record['minutes']} "
                  f"min; recipe in {target / 'recipe.json'})")
    if "adherence" in record:
        console.print(f"adherence: {record['adherence']}", markup=False)
