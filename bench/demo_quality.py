"""Adherence of the demo model (a script, not a test): held-out captions (a seed the training
never used), each drawn through the real Diffusers pipeline loaded from the model folder, read
back by the scorer (``engine.demo.score``); a table per attribute and per rendering.
Goals: background >= 95%, shape colour >= 90%, shape kind >= 80%, position >= 80%; ``axis``
(not a goal) says how many two-shape pictures have their shapes along the asked axis.

``.venv/bin/python -m bench.demo_quality [--model cluster/data/demo] [--n 200] [--steps 20]``
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.demo.quality import GOALS, adherence, at_sides, held_out
from engine.demo.score import AXIS

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "cluster" / "data" / "demo"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sides", type=int, default=40,
                        help="plus this many lone shapes at a named side (seed + 1)")
    args = parser.parse_args()
    cases = held_out(args.n, random.Random(args.seed))
    # The lone shapes at a side in the same run: one pipeline load for both.
    sides = at_sides(args.sides, random.Random(args.seed + 1))
    started = time.monotonic()
    drawn = adherence(args.model, cases + sides, steps=args.steps, guidance=args.guidance,
                      device=args.device, batch=8 if args.device == "cpu" else 50)
    rows, lone = drawn[:len(cases)], drawn[len(cases):]
    took = time.monotonic() - started
    print(f"demo model {args.model}: {len(cases)} held-out captions (seed {args.seed}), "
          f"{args.steps} steps, {took:.0f} s")
    for group in [*sorted({r.rendering for r in rows}), "all"]:
        ok: Counter[str] = Counter()
        total: Counter[str] = Counter()
        for r in rows:
            if group in ("all", r.rendering):
                for name, value in r.result.items():
                    if value is not None:
                        total[name] += 1
                        ok[name] += int(value)
        cells = "  ".join(
            f"{name} {100 * ok[name] / total[name]:5.1f}% ({ok[name]}/{total[name]})"
            for name in [*GOALS, AXIS] if total[name])
        print(f"  {group:<10} {cells}")
    for name, goal in GOALS.items():
        total_n = sum(r.result[name] is not None for r in rows)
        share = sum(bool(r.result[name]) for r in rows) / max(total_n, 1)
        verdict = "ok" if share >= goal else "MISSED"
        print(f"  goal {name:<10} >= {goal:.0%}: {share:.1%} {verdict}")
    # Position split in two: the shapes along the asked axis (either way round), and of those,
    # the ones the right way round (50% is a coin toss: the words are read, not their order).
    along = [r for r in rows if r.result[AXIS]]
    right = sum(bool(r.result["position"]) for r in along)
    print(f"  position, split: along the asked axis {len(along)}/"
          f"{sum(r.result[AXIS] is not None for r in rows)}; of those, the asked way round "
          f"{right}/{len(along)} ({100 * right / max(len(along), 1):.1f}%)")
    if lone:
        placed, colour, kind = (sum(bool(r.result[k]) for r in lone)
                                for k in ("position", "colour", "kind"))
        print(f"  a lone shape at the named side (left/right/top/bottom): {placed}/{len(lone)} "
              f"({100 * placed / len(lone):.1f}%); its colour {colour}/{len(lone)}, kind "
              f"{kind}/{len(lone)}")


if __name__ == "__main__":
    main()
