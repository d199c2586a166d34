"""Adherence of the demo model (a script, not a test): held-out captions (a seed the training
never used), each drawn through the real Diffusers pipeline loaded from the model folder, read
back by the scorer (``engine.demo.score``); a table per attribute and per rendering, for the
captions' grammar and, separately, for phrasings people type in templates training never used
(issue 27; ``--typo-rate`` of them with a typo).
Goals: background >= 95%, shape colour >= 90%, shape kind >= 80%, position >= 80%; ``axis``
(not a goal) says how many two-shape pictures have their shapes along the asked axis.

``.venv/bin/python -m bench.demo_quality [--model cluster/data/demo] [--n 200] [--steps 20]
[--paraphrases 200] [--typo-rate 0.1] [--size 128]``
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

from engine.demo.quality import GOALS, Row, adherence, at_sides, held_out, paraphrased
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
    parser.add_argument("--size", type=int, default=None,
                        help="draw at this side (default: the model's own, 128)")
    parser.add_argument("--sides", type=int, default=40,
                        help="plus this many lone shapes at a named side (seed + 1)")
    parser.add_argument("--paraphrases", type=int, default=200,
                        help="plus this many held-out phrasings (seed + 2)")
    parser.add_argument("--typo-rate", type=float, default=0.1,
                        help="the share of the phrasings with one mistyped word")
    args = parser.parse_args()
    cases = held_out(args.n, random.Random(args.seed))
    # The lone shapes at a side and the phrasings in the same run: one pipeline load for all.
    sides = at_sides(args.sides, random.Random(args.seed + 1))
    phrased = paraphrased(args.paraphrases, random.Random(args.seed + 2),
                          typo_rate=args.typo_rate)
    started = time.monotonic()
    drawn = adherence(args.model, cases + sides + phrased, steps=args.steps,
                      guidance=args.guidance, device=args.device,
                      batch=8 if args.device == "cpu" else 50, size=args.size)
    rows, lone = drawn[:len(cases)], drawn[len(cases):len(cases) + len(sides)]
    took = time.monotonic() - started
    side = f"{args.size}²" if args.size else "its own size"
    print(f"demo model {args.model}: {len(cases)} held-out captions (seed {args.seed}), "
          f"{len(phrased)} held-out phrasings, {args.steps} steps, at {side}, {took:.0f} s")
    print(" the captions' grammar:")
    table(rows)
    goals(rows)
    split(rows)
    if lone:
        placed, colour, kind = (sum(bool(r.result[k]) for r in lone)
                                for k in ("position", "colour", "kind"))
        print(f"  a lone shape at the named side (left/right/top/bottom): {placed}/{len(lone)} "
              f"({100 * placed / len(lone):.1f}%); its colour {colour}/{len(lone)}, kind "
              f"{kind}/{len(lone)}")
    if phrased:
        words = drawn[len(cases) + len(sides):]
        print(f" held-out phrasings (typo rate {args.typo_rate:g}), "
              f"e.g. {words[0].case.prompt!r}:")
        table(words)
        goals(words)


def table(rows: list[Row]) -> None:
    """One line per rendering and one for all: each attribute's share right."""
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


def goals(rows: list[Row]) -> None:
    for name, goal in GOALS.items():
        total_n = sum(r.result[name] is not None for r in rows)
        share = sum(bool(r.result[name]) for r in rows) / max(total_n, 1)
        verdict = "ok" if share >= goal else "MISSED"
        print(f"  goal {name:<10} >= {goal:.0%}: {share:.1%} {verdict}")


def split(rows: list[Row]) -> None:
    """Position split in two: the shapes along the asked axis (either way round), and of
    those, the ones the right way round (50% is a coin toss: the words are read, not their
    order)."""
    along = [r for r in rows if r.result[AXIS]]
    right = sum(bool(r.result["position"]) for r in along)
    print(f"  position, split: along the asked axis {len(along)}/"
          f"{sum(r.result[AXIS] is not None for r in rows)}; of those, the asked way round "
          f"{right}/{len(along)} ({100 * right / max(len(along), 1):.1f}%)")


if __name__ == "__main__":
    main()
