"""The demo LoRA's effect (a script, not a test): held-out plain captions drawn by the demo model
with and without the outline LoRA (cluster/data/demo-lora), side by side in one run and from the
same seeds, read back by the scorer: the share drawn as outlines (``engine.demo.score.outlined``),
the mean fill ratio, and whether the rest of the caption (background, colour, kind, position)
still comes out. Also what switching the LoRA on and off costs next to drawing one picture.

``.venv/bin/python -m bench.demo_lora [--n 64] [--steps 20] [--weight 1] [--threads 1]``
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cluster.registry import DEMO_LORA_DIR, DEMO_MODEL_DIR
from engine.demo.lora import LORA_FILE
from engine.demo.quality import GOALS, Case, draw, load
from engine.demo.scenes import random_scene
from engine.demo.score import fill_ratio, outlined, score


def summary(label: str, cases: list[Case], images: list) -> str:  # type: ignore[type-arg]
    lines = [outlined(img, c.scene) for c, img in zip(cases, images, strict=True)]
    ratios = [r for c, img in zip(cases, images, strict=True)
              if (r := fill_ratio(img, c.scene)) is not None]
    results = [score(img, c.scene) for c, img in zip(cases, images, strict=True)]
    cells = []
    for name in GOALS:
        values = [r[name] for r in results if r[name] is not None]
        cells.append(f"{name} {sum(bool(v) for v in values)}/{len(values)}")
    outline = sum(v is True for v in lines)
    return (f"  {label:<16} outlines {outline}/{len(cases)} ({100 * outline / len(cases):.1f}%), "
            f"mean fill ratio {sum(ratios) / max(len(ratios), 1):.2f}; {', '.join(cells)}")


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEMO_MODEL_DIR)
    parser.add_argument("--lora", type=Path, default=DEMO_LORA_DIR / LORA_FILE)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--weight", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)  # a seed the LoRA's training (0) never used
    cases = [Case(random_scene(rng, sided=0.3), None, rng.randrange(2**31)) for _ in range(args.n)]
    pipe = load(args.model)
    pipe.load_lora_weights(str(args.lora.parent), weight_name=args.lora.name,
                           adapter_name="outline")

    started = time.monotonic()
    pipe.disable_lora()
    without = draw(pipe, cases, steps=args.steps)
    per_picture = (time.monotonic() - started) / len(cases)
    pipe.enable_lora()
    pipe.set_adapters(["outline"], adapter_weights=[args.weight])
    with_it = draw(pipe, cases, steps=args.steps)

    switches = 20
    began = time.monotonic()
    for _ in range(switches):
        pipe.disable_lora()
        pipe.enable_lora()
        pipe.set_adapters(["outline"], adapter_weights=[args.weight])
    switch = (time.monotonic() - began) / switches

    print(f"demo LoRA {args.lora} ({args.lora.stat().st_size:,} bytes) on {args.model}: "
          f"{len(cases)} held-out plain captions (seed {args.seed}), {args.steps} steps, "
          f"weight {args.weight:g}, {args.threads} thread(s)")
    print(summary("without the LoRA", cases, without))
    print(summary("with the LoRA", cases, with_it))
    print(f"  switch off/on (disable_lora + enable_lora + set_adapters): {1000 * switch:.1f} ms; "
          f"one picture (batch of 8, {args.steps} steps): {1000 * per_picture:.0f} ms "
          f"(switch = {switch / per_picture:.3f} x a picture)")


if __name__ == "__main__":
    main()
