"""torch.compile and int8 on this machine, measured so they can be trusted: the SD1.5-shaped UNet
eager, torchao int8 (weight-only, dynamic) and compiled (inductor), each variant in a fresh
process (no allocator, thread-pool or dynamo state carried between them), the order reversed
every other round, inductor's on-disk cache cold in the first round and warm after. Prints
s/step (best of ``--steps`` after the warm-up call) by the clock and in process CPU time (which
another process's load sways far less than the clock), the first call's extra time (the
compile) and peak RSS, then each variant's speed against eager's per round and their medians.

    .venv/bin/python -m bench.compile [--side 256] [--rounds 2] [--steps 3] [--dtype bfloat16]
        [--variants eager,int8,int8-dynamic,compiled] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import gc, json, sys, time
import torch
from engine.calibrate import _peak_reset, unet_case
from engine.calibrate import quantize_module
side, steps, dtype, variant, tiny = json.loads(sys.argv[1])
compile_ = variant == "compiled"
_, build, inputs = unet_case(side, tiny=tiny)
model = build(getattr(torch, dtype)).eval()
if variant.startswith("int8"):
    quantize_module(model, variant)
if compile_:
    model.compile()
kwargs = inputs(getattr(torch, dtype))
gc.collect()
peak = _peak_reset("cpu")
walls, cpus = [], []
with torch.inference_mode():
    start = time.perf_counter()
    model(**kwargs)
    first = time.perf_counter() - start
    for _ in range(steps):
        wall, cpu = time.perf_counter(), time.process_time()
        model(**kwargs)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
print("RESULT " + json.dumps({"s": min(walls), "cpu": min(cpus), "peak": peak(),
                              "compile": max(0.0, first - min(walls)) if compile_ else None,
                              "error": None}))
"""

VARIANTS = ("eager", "int8", "int8-dynamic", "compiled")


def measure(side: int, steps: int, dtype: str, variant: str, tiny: bool,
            cache: Path) -> dict[str, float | None]:
    """One variant in a fresh interpreter; ``cache``: inductor's on-disk cache for it."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps([side, steps, dtype, variant, tiny])],
        cwd=ROOT, env=env, capture_output=True, text=True, check=False,
    )
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            result: dict[str, float | None] = json.loads(line[len("RESULT "):])
            return result
    raise RuntimeError(f"the measuring process failed:\n{out.stderr[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--variants", default="eager,compiled",
                        help=f"comma-separated, of {', '.join(VARIANTS)} (eager first: the base)")
    parser.add_argument("--tiny", action="store_true", help="the tiny UNet (a smoke run)")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants or variants[0] != "eager":
        parser.error(f"--variants: start with eager, then any of {', '.join(VARIANTS[1:])}; "
                     f"got {args.variants!r}")
    shape = "tiny" if args.tiny else "sd15-shaped"
    print(f"{shape} UNet, CFG x2 at {args.side}², {args.dtype}, {os.cpu_count()} CPUs; "
          f"each variant in its own process, the order reversed every other round", flush=True)
    ratios: dict[str, list[tuple[float, float]]] = {v: [] for v in variants[1:]}
    with tempfile.TemporaryDirectory(prefix="atelier-inductor-") as cache_dir:
        cache = Path(cache_dir)
        for r in range(args.rounds):
            got = {}
            for variant in variants if r % 2 == 0 else variants[::-1]:
                res = got[variant] = measure(args.side, args.steps, args.dtype, variant,
                                             args.tiny, cache)
                extra = ""
                if variant == "compiled":
                    warm = "cold" if "compiled" not in ratios or not ratios["compiled"] else "warm"
                    extra = f", first call +{res['compile']:.1f} s (inductor cache {warm})"
                print(f"  round {r + 1} {variant:<13} {res['s']:7.3f} s/step wall, "
                      f"{res['cpu']:7.3f} s/step CPU time, peak {res['peak'] or 0:,.0f} MB{extra}",
                      flush=True)
            base = got["eager"]
            for variant in variants[1:]:
                v = got[variant]
                pair = (float(base["s"] or 0) / float(v["s"] or 1),
                        float(base["cpu"] or 0) / float(v["cpu"] or 1))
                ratios[variant].append(pair)
                print(f"  round {r + 1}: {variant} is {pair[0]:.2f}x eager's speed by the clock, "
                      f"{pair[1]:.2f}x by CPU time", flush=True)
    for variant, pairs in ratios.items():
        print(f"{variant} / eager speed, median of {len(pairs)} rounds: "
              f"{statistics.median(p[0] for p in pairs):.2f}x by the clock, "
              f"{statistics.median(p[1] for p in pairs):.2f}x by CPU time "
              "(less swayed by other load)")


if __name__ == "__main__":
    main()
