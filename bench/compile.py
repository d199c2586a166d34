"""torch.compile on this machine, measured so it can be trusted: the SD1.5-shaped UNet eager and
compiled (inductor), each variant in a fresh process (no allocator, thread-pool or dynamo state
carried between them), the order alternating over rounds, inductor's on-disk cache cold in the
first round and warm after. Prints s/step (best of ``--steps`` after the warm-up call) by the
clock and in process CPU time (which another process's load sways far less than the clock), the
first call's extra time (the compile) and peak RSS, then the compiled/eager ratio per round.

    .venv/bin/python -m bench.compile [--side 256] [--rounds 2] [--steps 3] [--dtype bfloat16]
        [--tiny]
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
side, steps, dtype, compile_, tiny = json.loads(sys.argv[1])
_, build, inputs = unet_case(side, tiny=tiny)
model = build(getattr(torch, dtype)).eval()
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

def measure(side: int, steps: int, dtype: str, compiled: bool, tiny: bool,
            cache: Path) -> dict[str, float | None]:
    """One variant in a fresh interpreter; ``cache``: inductor's on-disk cache for it."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps([side, steps, dtype, compiled, tiny])],
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
    parser.add_argument("--tiny", action="store_true", help="the tiny UNet (a smoke run)")
    args = parser.parse_args()
    shape = "tiny" if args.tiny else "sd15-shaped"
    print(f"{shape} UNet, CFG x2 at {args.side}², {args.dtype}, {os.cpu_count()} CPUs; "
          f"each variant in its own process", flush=True)
    ratios: list[float] = []
    cpu_ratios: list[float] = []
    with tempfile.TemporaryDirectory(prefix="atelier-inductor-") as cache_dir:
        cache = Path(cache_dir)
        for r in range(args.rounds):
            order = [False, True] if r % 2 == 0 else [True, False]
            got = {}
            for compiled in order:
                res = measure(args.side, args.steps, args.dtype, compiled, args.tiny, cache)
                got[compiled] = res
                name = "compiled" if compiled else "eager"
                if res["error"]:
                    print(f"  round {r + 1} {name:<9} failed: {res['error']}", flush=True)
                    continue
                extra = f", first call +{res['compile']:.1f} s" if compiled else ""
                state = "" if not compiled else (" (inductor cache cold)" if r == 0
                                                 else " (inductor cache warm)")
                print(f"  round {r + 1} {name:<9} {res['s']:7.3f} s/step wall, "
                      f"{res['cpu']:7.3f} s/step CPU time, peak "
                      f"{res['peak'] or 0:,.0f} MB{extra}{state}", flush=True)
            if not got[True]["error"] and not got[False]["error"]:
                ratio = float(got[False]["s"] or 0) / float(got[True]["s"] or 1)
                by_cpu = float(got[False]["cpu"] or 0) / float(got[True]["cpu"] or 1)
                ratios.append(ratio)
                cpu_ratios.append(by_cpu)
                print(f"  round {r + 1}: compiled is {ratio:.2f}x eager's speed by the clock, "
                      f"{by_cpu:.2f}x by CPU time", flush=True)
    if ratios:
        print(f"compiled / eager speed, median of {len(ratios)} rounds: "
              f"{statistics.median(ratios):.2f}x by the clock, "
              f"{statistics.median(cpu_ratios):.2f}x by CPU time (less swayed by other load)")


if __name__ == "__main__":
    main()
