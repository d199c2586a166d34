"""ControlNet benchmarks on this machine's CPU (a script, not a test): a ControlNet job vs the
same job without control, and two people's ControlNet jobs (different pictures, one ControlNet)
in one pipeline call vs one at a time. Two models: the tiny one with a tiny random ControlNet
built offline (the engine's overhead and the batching, not a real ControlNet's cost), and the
demo model with its trained ControlNet (``demo-canny``, a real copy of its UNet's encoder).

Run from the repository root: ``.venv/bin/python -m bench.controlnet [--reps N] [--models
tiny,demo] [--threads N]`` (a minute or two on 2 cores).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image, ImageDraw

from bench.engine import Row, print_table, timed_pair
from cluster.adapters import AdapterSpec
from cluster.contract import BatchItem
from cluster.registry import ModelRegistry
from core.control import ControlUnit
from core.images import validate_image
from core.request import GenerationRequest
from core.settings import load_settings
from engine.cache import ModelCache
from engine.devices import best_device, choose_profile
from engine.engine import Engine
from engine.tiny import make_tiny_controlnet, make_tiny_models


def picture(box: tuple[int, int, int, int], side: int) -> bytes:
    img = Image.new("RGB", (side, side), "black")
    ImageDraw.Draw(img).ellipse(box, fill="white")
    out = io.BytesIO()
    img.save(out, format="PNG")
    return validate_image(out.getvalue(), max_bytes=10**7, max_pixels=10**7).png


def rows_for(engine: Engine, model: str, controlnet: str, side: int, steps: int, reps: int,
             what: str) -> list[Row]:
    left = picture((side // 16, side // 3, side // 2, side * 2 // 3), side)
    right = picture((side // 2, side // 3, side * 15 // 16, side * 2 // 3), side)

    def request(seed: int, image: bytes | None) -> GenerationRequest:
        control = (ControlUnit(controlnet=controlnet, preprocessor="canny", image=image)
                   if image is not None else None)
        return GenerationRequest(prompt="a red circle on a blue background", model=model,
                                 width=side, height=side, steps=steps, seed=seed,
                                 scheduler="Euler", control=control)

    plain = [BatchItem("plain", request(1, None))]
    controlled = [BatchItem("control", request(1, left))]
    plain_s, control_s = timed_pair(
        lambda: engine.generate(plain), lambda: engine.generate(controlled), reps
    )
    two = [BatchItem("alice", request(1, left)), BatchItem("bob", request(2, right))]
    apart, together = timed_pair(
        lambda: [engine.generate([item]) for item in two], lambda: engine.generate(two), reps,
    )
    return [
        (what, "plain job", plain_s, ""),
        (what, "ControlNet job", control_s,
         f"{control_s / plain_s:.2f}x the plain job (canny map + ControlNet per step)"),
        (what + ", 2 people", "one at a time", apart, f"{2 / apart:.2f} img/s"),
        (what + ", 2 people", "one call (two pictures)", together,
         f"{2 / together:.2f} img/s, {apart / together:.2f}x"),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="alternating repetitions")
    parser.add_argument("--side", type=int, default=64, help="tiny: image side (a multiple of 8)")
    parser.add_argument("--steps", type=int, default=8, help="tiny: steps")
    parser.add_argument("--demo-steps", type=int, default=20, help="demo: steps (its default)")
    parser.add_argument("--models", default="tiny,demo", help="tiny, demo or both")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: the profile's)")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if unknown := set(models) - {"tiny", "demo"}:
        parser.error(f"--models: unknown {', '.join(sorted(unknown))}; use tiny and/or demo")
    profile = choose_profile(best_device(), "sd15")
    if args.threads:
        profile = dataclasses.replace(profile, threads=args.threads)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        registry = ModelRegistry.load(load_settings(data_dir=data_dir, _env_file=None))
        if "tiny" in models:
            make_tiny_models(data_dir / "models")
            edges = make_tiny_controlnet(data_dir / "models" / "tiny-sd15", data_dir / "edges")
            registry = ModelRegistry.load(load_settings(data_dir=data_dir, _env_file=None))
            registry = registry.with_adapters(AdapterSpec(
                name="edges", kind="controlnet", file=str(edges), family="sd15",
                preprocessor="canny"
            ))
        engine = Engine(ModelCache(registry, profile, 2**30, offline=True), profile=profile)
        if "tiny" in models:
            rows += rows_for(engine, "tiny", "edges", args.side, args.steps, args.reps,
                             f"tiny {args.side}² {args.steps} steps, tiny ControlNet")
        if "demo" in models:
            rows += rows_for(engine, "demo", "demo-canny", 64, args.demo_steps, args.reps,
                             f"demo 64² {args.demo_steps} steps, demo-canny")
    print(f"profile: {profile.device_class} {profile.dtype}, threads {profile.threads}")
    print_table(rows)


if __name__ == "__main__":
    main()
