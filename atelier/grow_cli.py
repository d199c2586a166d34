"""``atelier models grow-demo``: grows a 64² demo model's autoencoder one stage, so the same
UNet draws 128² pictures (engine/demo/grow.py; how the shipped model got its size)."""

from __future__ import annotations

import typer

from atelier.wiring import (
    REPLACE_HELP,
    console,
    keep_shipped,
    quiet_ml_libraries,
    recipe_from_options,
)


def grow_demo(
    source: str | None = typer.Option(
        None, "--from", help="the demo model folder to grow; default: the shipped one"
    ),
    out: str | None = typer.Option(
        None, help="where to save the grown model; default: the --from folder, in place "
        "(the shipped one only with --replace)"
    ),
    minutes: float = typer.Option(24.0, help="wall-clock budget for both phases"),
    threads: int = typer.Option(2, help="torch threads"),
    steps: int | None = typer.Option(None, help="stop each phase after this many steps"),
    overrides: list[str] | None = typer.Option(
        None, "--set", help="a recipe field, e.g. --set pool=3000 (see GrowRecipe)"
    ),
    replace: bool = typer.Option(False, "--replace", help=REPLACE_HELP),
) -> None:
    """Grow a demo model's pictures to twice the side: its autoencoder gains a stage and learns
    to draw the larger scenes from the latents its UNet already makes."""
    from pathlib import Path

    from cluster.registry import DEMO_MODEL_DIR
    from engine.demo.grow import GrowRecipe, grow

    quiet_ml_libraries()
    folder = Path(source) if source else DEMO_MODEL_DIR
    if not (folder / "vae" / "config.json").is_file():
        raise typer.BadParameter(f"{folder} is not a demo model folder (no vae/ in it)",
                                 param_hint="--from")
    target = Path(out) if out else folder
    keep_shipped(target, replace)
    recipe = recipe_from_options(GrowRecipe(minutes=minutes, threads=threads), steps, overrides)
    record = grow(folder, target, recipe, progress=console.print)
    console.print(f"grown: {target} ({record['minutes']} min; PSNR {record['psnr_grown_decoder']}"
                  f" dB against the larger scenes, {record['psnr_old_decoder_upscaled']} dB "
                  f"the old pictures upscaled; recipe in {target / 'recipe.json'})")
