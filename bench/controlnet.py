"""ControlNet benchmarks on this machine's CPU (a script, not a test): a ControlNet job vs the
same job without control, and two people's ControlNet jobs (different pictures, one ControlNet)
in one pipeline call vs one at a time. Tiny model and a tiny random ControlNet built offline:
what it shows is the engine's overhead and the batching, not a real ControlNet's cost.

Run from the repository root: ``.venv/bin/python -m bench.controlnet [--reps N] [--side 64]``
(under a minute on 2 cores).
"""

from __future__ import annotations

import argparse
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="alternating repetitions")
    parser.add_argument("--side", type=int, default=64, help="image side (a multiple of 8)")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args(argv)
    side, steps = args.side, args.steps
    profile = choose_profile(best_device(), "sd15")
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        make_tiny_models(data_dir / "models")
        edges = make_tiny_controlnet(data_dir / "models" / "tiny-sd15", data_dir / "edges")
        registry = ModelRegistry.load(load_settings(data_dir=data_dir, _env_file=None))
        registry = registry.with_adapters(AdapterSpec(
            name="edges", kind="controlnet", file=str(edges), family="sd15", preprocessor="canny"
        ))
        engine = Engine(ModelCache(registry, profile, 2**30, offline=True), profile=profile)
        left = picture((side // 16, side // 3, side // 2, side * 2 // 3), side)
        right = picture((side // 2, side // 3, side * 15 // 16, side * 2 // 3), side)

        def request(seed: int, image: bytes | None) -> GenerationRequest:
            control = (ControlUnit(controlnet="edges", preprocessor="canny", image=image)
                       if image is not None else None)
            return GenerationRequest(prompt="a red circle", model="tiny", width=side,
                                     height=side, steps=steps, seed=seed, scheduler="Euler",
                                     control=control)

        plain = [BatchItem("plain", request(1, None))]
        controlled = [BatchItem("control", request(1, left))]
        plain_s, control_s = timed_pair(
            lambda: engine.generate(plain), lambda: engine.generate(controlled), args.reps
        )
        two = [BatchItem("alice", request(1, left)), BatchItem("bob", request(2, right))]
        apart, together = timed_pair(
            lambda: [engine.generate([item]) for item in two], lambda: engine.generate(two),
            args.reps,
        )
    what = f"tiny {side}² {steps} steps, tiny ControlNet (canny)"
    rows: list[Row] = [
        (what, "plain job", plain_s, ""),
        (what, "ControlNet job", control_s,
         f"{control_s / plain_s:.2f}x the plain job (canny map + ControlNet per step)"),
        (what + ", 2 people", "one at a time", apart, f"{2 / apart:.2f} img/s"),
        (what + ", 2 people", "one call (two pictures)", together,
         f"{2 / together:.2f} img/s, {apart / together:.2f}x"),
    ]
    print(f"profile: {profile.device_class} {profile.dtype}")
    print_table(rows)


if __name__ == "__main__":
    main()
